"""libremote's wire: what travels between clients, the daemon's front and its workers.

Everything here but :mod:`.torch_codec` and :mod:`.numerics` is free of torch, so that programs
which only speak the wire (the daemon's front, the ``libremote`` command, a dashboard, a C shim)
do not import it:

- :mod:`.codec`: MessagePack framing, the extension types, bounded decoding;
- :mod:`.messages`: every message, command and control message with its fields, their types and
  their bounds, declared once; the front, the workers and the client decode through them;
- :mod:`.curve_keys`: CURVE key files; :mod:`.zmq_events`: a cheap readiness check;
- :mod:`.cli`: the ``libremote`` command (status, admin, keygen).

Peers that hold tensors (the client and the workers) add :mod:`.torch_codec` (dtypes, layouts,
memory formats and small tensors as extension values) and :mod:`.numerics` (torch's numerics
switches, set per session).
"""

__version__ = "0.2.0"
