"""Helpers for the values commands carry: handles inside encoded commands, tensors inside
resolved arguments, op results as the wire carries them, and tensor layouts."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from libremote_wire import codec, torch_codec
from libremote_wire.codec import HandleRef
from libremote_wire.messages import Cmd

from . import sparse
from .op_policy import OpEntry


def handles_named(command: Any) -> Iterator[int]:
    """Handles a queued (still encoded) command reads or writes."""
    if not isinstance(command, list) or not command:
        return
    kind = command[0]
    if kind in (Cmd.OP, Cmd.OP_SYNC) and len(command) == 5:
        yield from handle_refs([command[2], list(command[3].values()) if isinstance(command[3], dict) else []])
    elif kind == Cmd.RUN_GRAPH and len(command) == 4:
        yield from handle_refs(command[2])
    elif kind in (Cmd.FETCH, Cmd.UPLOAD) and len(command) >= 2 and isinstance(command[1], int):
        yield command[1]


def handle_refs(value: Any) -> Iterator[int]:
    """Handles referenced (``HandleRef``) anywhere inside ``value``'s nested lists."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, HandleRef):
            yield item.handle
        elif isinstance(item, list):
            stack.extend(item)


def tensors_in(args: list[Any], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    tensors = []
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            tensors.append(value)
        elif isinstance(value, list):
            tensors.extend(item for item in value if isinstance(item, torch.Tensor))
    return tensors


def device_of(args: list[Any], kwargs: dict[str, Any]) -> torch.device | None:
    """The device an op runs on: its first tensor's, else its ``device`` argument."""
    for value in args:
        if isinstance(value, torch.Tensor):
            return value.device
        if isinstance(value, list):
            for item in value:
                if isinstance(item, torch.Tensor):
                    return item.device
    device = kwargs.get("device")
    return device if isinstance(device, torch.device) else None


def unstorable(tensor: torch.Tensor, devices: Sequence[torch.device]) -> str | None:
    """Why the daemon will not keep ``tensor`` under a handle, or None. A handle holds a strided
    tensor over a storage on one of the session's devices: the memory account charges and frees
    that storage, FETCH reads it, and every later op may take it as an input. (Non-strided and
    wrapper tensors, such as mkldnn, quantized or functorch-batched ones, have no storage to
    charge, and their kernels trust invariants a client could break.) Sparse tensors are kept
    when their parts are such tensors and they pass torch's invariant checks (sparse.py)."""
    if tensor.layout is not torch.strided:
        if sparse.is_sparse(tensor):
            return sparse.unstorable(tensor, devices)
        return f"is a {tensor.layout} tensor; the daemon keeps strided and sparse tensors only"
    return unstorable_strided(tensor, devices)


def unstorable_strided(tensor: torch.Tensor, devices: Sequence[torch.device]) -> str | None:
    """:func:`unstorable` of a tensor known to be strided."""
    if tensor.is_quantized:
        return "is a quantized tensor; the daemon keeps strided tensors only"
    if tensor.device not in devices:
        return f"is on {tensor.device}, which is not one of this session's devices"
    try:
        tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return "has no storage (a wrapper tensor); the daemon keeps tensors with storage only"
    return None


def size_text(nbytes: int) -> str:
    if nbytes >= 1 << 30:
        return f"{nbytes / (1 << 30):.2f} GiB"
    return f"{nbytes / (1 << 20):.2f} MiB"


def returned_values(entry: OpEntry, result: Any) -> tuple[Any, ...]:
    """The op's result as one value per schema return (ops returning ``()`` give None)."""
    count = len(entry.overload._schema.returns)
    if count == 0:
        return ()
    if count == 1:
        return (result,)
    return tuple(result)


def flatten_handles(outs: Any, depth: int = 0) -> Iterator[Any]:
    """The entries of an ``outs`` field (handles, or whatever a hostile client put there), nested
    lists flattened, at most codec.MAX_NESTING deep."""
    if isinstance(outs, list):
        if depth >= codec.MAX_NESTING:
            raise codec.ProtocolError(f"outs are nested more than {codec.MAX_NESTING} deep")
        for item in outs:
            yield from flatten_handles(item, depth + 1)
    elif outs is not None:
        yield outs


def wire_value(value: Any) -> Any:
    """A non-tensor op result as msgpack can carry it (tensors travel as handles instead)."""
    if isinstance(value, torch.Tensor) or value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [wire_value(item) for item in value]
    if isinstance(value, complex):
        return codec.complex_ext(value)
    if isinstance(value, torch.dtype):
        return torch_codec.dtype_ext(value)
    return value


def wire_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch_codec.tensor_meta(value)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return [torch_codec.tensor_meta(v) for v in value]
    return None


def error_message(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    # torch appends long C++ backtraces in some builds; the first paragraph is what users need.
    return text.split("\nException raised from")[0][:4000]
