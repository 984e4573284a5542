"""The libremote client: remote tensors, the op path, and the ``cuda`` facade.

Four layers, each module in one (its docstring says which); a module imports from its own layer
and the ones below, never from above (tests/test_layering.py). Where a lower layer needs an upper
one, the upper one hands it a callback when the client is registered (:mod:`.registration`).

1. The session: the wire connection to the daemon, the session over it, one session per daemon
   when the program's devices are on several, process-wide state (:mod:`.connection`,
   :mod:`.session`, :mod:`.auto_replay`, :mod:`.servers`, :mod:`.runtime`, :mod:`.device_guard`, :mod:`.warning_location`).
2. Remote tensors and their metadata (:mod:`.backend`, :mod:`.legacy_types`, :mod:`.tensor`,
   :mod:`.sparse`, :mod:`.generators`, :mod:`.ops`, :mod:`.meta`).
3. The op path: aten ops, copies, graphs and recordings sent to the daemon (:mod:`.dispatch`,
   :mod:`.sparse_dispatch`, :mod:`.sync`, :mod:`.transfer` (between daemons), :mod:`.graphs`,
   :mod:`.capture`).
4. The torch-facing facade: what a program meets as ``torch.cuda``, ``torch.save``,
   ``torch.compile``, ... (:mod:`.cuda_api`, :mod:`.cuda_graph`, :mod:`.parallel`, :mod:`.amp`,
   :mod:`.attention`, :mod:`.ctc_loss`, :mod:`.device_map`, :mod:`.serialization`, :mod:`.compile`,
   :mod:`.optim`, :mod:`.parameter_identity`), with what turns it on: :mod:`.registration`,
   :mod:`.patches` (every replaced name) and :mod:`.activation`.
"""
