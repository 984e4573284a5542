"""Sync points that move data between the host and the daemon.

Layer 3, the op path, over :mod:`.dispatch`: it runs ``_to_copy`` and ``copy_`` for it
(:data:`SPECIAL_OPS`, handed over by :mod:`.registration`) and calls :func:`.dispatch.run` for the
device's side.

``.cpu()`` / ``.to("cpu")`` arrive as ``aten._to_copy(device=cpu)``, ``cpu_t.copy_(remote)`` and
``remote.copy_(cpu_t)`` as ``aten.copy_``. Downloads (:func:`.tensor.fetch`, which printing uses
too) arrive as one ZeroMQ frame that the result tensor views without a copy. Large uploads travel
in pieces, one message each, so that the daemon's copy of one piece (into device memory, on a GPU)
overlaps the transfer of the next.
"""

from __future__ import annotations

from typing import Any

import torch

from libremote_wire import torch_codec
from libremote_wire.messages import Cmd

from . import backend, runtime, transfer
from .dispatch import run
from .meta import spec_of
from .sparse import upload
from .tensor import RemoteTensor, fetch, make

aten = torch.ops.aten


def to_copy(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    device = kwargs.get("device")
    source = args[0]
    if not isinstance(source, RemoteTensor):
        if source.layout is not torch.strided:  # a host sparse tensor
            return upload(source, kwargs["device"].index or 0, kwargs.get("dtype"))
        return _upload_new(source, kwargs)
    if device is None or device.type == backend.BACKEND_NAME:
        if device is not None and transfer.crosses_daemons(source, device.index or 0):
            return transfer.moved(source, device.index or 0, kwargs)
        return run(func, args, kwargs)
    if device.type != "cpu":
        raise RuntimeError(f"libremote: cannot copy a remote tensor to {device}")
    host = fetch(source)
    rest = {key: value for key, value in kwargs.items() if key not in ("device", "non_blocking", "pin_memory")}
    if (
        rest.get("dtype") not in (None, host.dtype)
        or rest.get("memory_format") not in (None, torch.preserve_format)
        or rest.get("layout") not in (None, torch.strided)
    ):
        host = aten._to_copy.default(host, **rest)
    return host


def _upload_new(source: torch.Tensor, kwargs: dict[str, Any]) -> RemoteTensor:
    """``host_tensor.to(remote)``: a new remote tensor holding the host tensor's data."""
    device = kwargs["device"]
    dtype = kwargs.get("dtype") or source.dtype
    host = source if dtype == source.dtype else source.to(dtype)
    fmt = kwargs.get("memory_format") or torch.preserve_format
    layout_template = torch.empty_like(host, device="meta", memory_format=fmt)
    spec = spec_of(layout_template)
    session = runtime.session_for(device.index or 0)
    if host.nbytes >= PIPELINED_UPLOAD_BYTES:
        if layout_template.is_contiguous():
            return _upload_in_pieces(host, spec, session, device.index or 0)
        return _laid_out(_staged(host, session, device.index or 0), spec)
    target = make(spec, session, device.index or 0)
    dtype_ext = torch_codec.dtype_ext(spec[0])
    fields = [Cmd.PUT, target._ref.id, dtype_ext, list(spec[1]), list(spec[2]), session.local_device(target._device_index)]
    session.submit_data(fields, host)
    return target


#: Host tensors at least this large travel in pieces of UPLOAD_PIECE_BYTES, one message each, so
#: the daemon copies one piece into place (on a GPU: host to device) while the next is on the
#: wire. Sent whole, the daemon's copy starts only after the last byte has arrived. Every upload
#: this large goes in pieces, whatever its layout: no frame the client sends is larger than this,
#: which lets the daemon refuse larger ones (--max-message-size, server/limits.py).
PIPELINED_UPLOAD_BYTES = 16 << 20
UPLOAD_PIECE_BYTES = 8 << 20


def _upload_in_pieces(host: torch.Tensor, spec: tuple[Any, ...], session: Any, device_index: int) -> RemoteTensor:
    """A new remote tensor (contiguous ``spec``) filled from ``host`` piece by piece: allocated
    on the daemon by an ``empty_strided`` op, then filled by :func:`_send_in_pieces`. Only
    existing commands: any daemon understands it."""
    dtype, shape, stride, _ = spec
    target = run(aten.empty_strided.default, (list(shape), list(stride)),
                 {"dtype": dtype, "device": backend.device(device_index)})
    _send_in_pieces(host, target, session)
    return target


def _staged(host: torch.Tensor, session: Any, device_index: int) -> RemoteTensor:
    """``host`` (large, any layout) as a new contiguous remote tensor, sent in pieces: the
    source of a remote copy into a destination that pieces cannot be written to directly."""
    contiguous = host.detach().contiguous()
    return _upload_in_pieces(contiguous, spec_of(contiguous), session, device_index)


def _laid_out(source: RemoteTensor, spec: tuple[Any, ...]) -> RemoteTensor:
    """A new remote tensor with ``spec``'s shape and strides holding ``source``'s values."""
    dtype, shape, stride, _ = spec
    target = run(aten.empty_strided.default, (list(shape), list(stride)),
                 {"dtype": dtype, "device": backend.device(source._device_index)})
    return run(aten.copy_.default, (target, source), {})


def _send_in_pieces(host: torch.Tensor, destination: RemoteTensor, session: Any) -> None:
    """Copy ``host`` into the contiguous, same-shaped ``destination``: one UPLOAD per piece into
    a flat window of it (dtype conversion, if any, happens on the daemon, piece by piece)."""
    flat_host = host.detach().contiguous().view(-1)
    dtype_ext = torch_codec.dtype_ext(flat_host.dtype)
    per_piece = max(1, UPLOAD_PIECE_BYTES // flat_host.element_size())
    offset = destination.storage_offset()
    for start in range(0, flat_host.numel(), per_piece):
        piece = flat_host[start:start + per_piece]
        window = run(aten.as_strided.default, (destination, [piece.numel()], [1], offset + start), {})
        session.submit_data([Cmd.UPLOAD, window._ref.id, dtype_ext, [piece.numel()]], piece)
        del window


def copy_(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    destination, source = args[0], args[1]
    remote_destination = isinstance(destination, RemoteTensor)
    remote_source = isinstance(source, RemoteTensor)
    if remote_destination and remote_source:  # also between devices, as CUDA allows
        if transfer.crosses_daemons(source, destination._device_index):
            return transfer.copied(destination, source)
        return run(func, args, kwargs, device_index=destination._device_index)
    if remote_destination:
        if source.device.type != "cpu":
            raise RuntimeError(f"libremote: cannot copy from {source.device} to a remote tensor")
        if source.nbytes >= PIPELINED_UPLOAD_BYTES:
            if source.shape == destination.shape and destination.is_contiguous():  # load_state_dict, say
                _send_in_pieces(source, destination, destination._ref.session)
                return destination
            # Another layout or a broadcast: the pieces go to a contiguous copy, copied on the daemon.
            staged = _staged(source, destination._ref.session, destination._device_index)
            return run(func, (destination, staged), kwargs, device_index=destination._device_index)
        fields = [Cmd.UPLOAD, destination._ref.id, torch_codec.dtype_ext(source.dtype), list(source.shape)]
        destination._ref.session.submit_data(fields, source)
        return destination
    # Download into an existing host tensor.
    destination.copy_(fetch(source))
    return destination


#: The ops this module runs for the op path: :func:`.registration.register` hands them to
#: :mod:`.dispatch`, which runs every other op and which they call back for the device's side.
SPECIAL_OPS = {
    aten._to_copy.default: to_copy,
    aten.copy_.default: copy_,
}
