"""Copies between devices of different daemons: daemon to daemon, never through the client.

Layer 3, the op path: :mod:`.sync` hands it ``.to(device)`` (``aten._to_copy``) and ``copy_``
when source and destination are on different daemons (:mod:`.servers`).

The path (docs/ARCHITECTURE.md, "The path of a cross-server copy"):

1. EXPORT to the source's daemon, as a request: its worker runs it in stream order, snapshots the
   tensor's bytes, and answers with a one-time token (random, 32 bytes) and the size. Waiting
   here is what makes the snapshot the tensor's value at this point of the program: later ops
   on it may stream on at once.
2. PULL to the destination's daemon, streamed like any op: its worker asks the source's worker
   (the address this client reached it at) for the export, piece by piece, with the token, and
   stores the bytes as a new contiguous tensor under a handle this client allocated. Only the
   token and the address travel through the client (a few hundred bytes), and the destination
   worker's commands after the PULL see the tensor.
3. Whatever else the op asks for (another dtype, a layout, ``copy_``'s broadcast into an existing
   tensor) runs on the destination daemon as an ordinary op.

Only the exporting session's client learns a token, and it gives it only to its own session on
the other daemon; an export is served once, expires, and dies with its session
(server/worker/exports.py says what the daemons enforce).
"""

from __future__ import annotations

from typing import Any

import torch

from libremote_wire import torch_codec
from libremote_wire.messages import Cmd

from .. import errors
from . import backend, runtime
from .dispatch import run
from .meta import spec_of
from .tensor import RemoteTensor, make

aten = torch.ops.aten


def crosses_daemons(source: RemoteTensor, device_index: int) -> bool:
    """Whether ``cuda:device_index`` is on another daemon than ``source``'s (never with one daemon)."""
    session = source._ref.session
    if len(session.global_devices) > 0 and device_index in session.global_devices:
        return False
    if session.closed:
        return False  # (the op path raises that the tensor belongs to a closed session)
    return runtime.session_for(device_index) is not session


def pulled(source: RemoteTensor, device_index: int) -> RemoteTensor:
    """A new contiguous tensor on ``cuda:device_index`` (another daemon) with ``source``'s values."""
    if source.layout is not torch.strided:
        raise RuntimeError(f"libremote: a {source.layout} tensor cannot move between daemons yet; move its "
                           "indices and values (strided tensors), or go through the host (.cpu())")
    origin = source._ref.session
    target_session = runtime.session_for(device_index)
    for session in (origin, target_session):
        if session.connection.broken:  # (before exporting anything: say which daemon is gone)
            raise errors.ConnectionFailed(session.connection.broken)
        if session.recording:
            raise errors.CaptureError(
                f"libremote: a captured step cannot move a tensor between daemons ({source.device} to "
                f"cuda:{device_index}): a replay would pull an export that was served already. Capture the "
                "work of each daemon as its own step and move the tensor between the calls.")
    # (From a CURVE daemon, two more: the export's one-time secret key and its worker's server
    # key, with which the target's worker connects; server/worker/exports.py.)
    token, nbytes, *curve = origin.request([Cmd.EXPORT, source._ref.id])[0]
    shape = list(source.shape)
    stride = list(torch.empty(shape, device="meta").stride()) if shape else []
    target = make((source.dtype, tuple(shape), tuple(stride), 0), target_session, device_index)
    target_session.submit([Cmd.PULL, target._ref.id, torch_codec.dtype_ext(source.dtype), shape,
                           target_session.local_device(device_index),
                           origin.connection.worker_address, token, nbytes, *curve])
    return target


def moved(source: RemoteTensor, device_index: int, kwargs: dict[str, Any]) -> RemoteTensor:
    """``aten._to_copy(source, device=cuda:device_index, ...)`` across daemons."""
    result = pulled(source, device_index)
    rest = {key: value for key, value in kwargs.items() if key not in ("device", "non_blocking", "pin_memory")}
    fmt = rest.get("memory_format") or torch.preserve_format
    # The layout torch would give the result (preserve_format keeps a dense source's strides).
    wanted = spec_of(torch.empty_like(torch.empty_strided(source.shape, source.stride(), dtype=source.dtype,
                                                          device="meta"), memory_format=fmt))
    if wanted[2] != result._spec[2]:
        laid_out = run(aten.empty_strided.default, (list(wanted[1]), list(wanted[2])),
                       {"dtype": result.dtype, "device": backend.device(device_index)})
        result = run(aten.copy_.default, (laid_out, result), {})
    dtype = rest.get("dtype")
    if dtype is not None and dtype != result.dtype:
        result = run(aten._to_copy.default, (result,), {"dtype": dtype})
    return result


def copied(destination: RemoteTensor, source: RemoteTensor) -> RemoteTensor:
    """``destination.copy_(source)`` with the two on different daemons."""
    staged = pulled(source, destination._device_index)
    return run(aten.copy_.default, (destination, staged), {}, device_index=destination._device_index)
