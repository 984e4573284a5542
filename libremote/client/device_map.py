"""Makes ``cuda`` mean the remote device, wherever a program names a device.

Layer 4, the torch-facing facade.

(The same torch-function mode also routes ``scaled_dot_product_attention`` to the fused remote
op, see :mod:`.attention`, and gives ``ctc_loss`` CUDA's handling of length tensors, see
:mod:`.ctc_loss`: it is the one place that sees torch API calls before dispatch.)

A torch-function mode sees every call of the torch API before it runs and rewrites device
arguments: ``device="cuda"``, ``torch.device("cuda", 1)``, ``.to("cuda:0")``, ``.cuda()``, a bare
ordinal in ``.to(0)``. It also gives ``pin_memory()``/``pin_memory=True``/``is_pinned()`` CUDA's
results with host memory marked as pinned (see :func:`_pin_memory`).

torch keeps mode stacks per thread, so the mode is entered in the importing thread and in every
thread started afterwards (``threading.Thread._bootstrap_inner`` is wrapped); autograd's own
worker threads inherit it from the thread that calls ``backward()``.

``torch.set_default_device("cuda")`` and ``with torch.device("cuda"):`` push torch's own device
mode above ours; the device it injects is rewritten by ours underneath.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from . import attention, backend, ctc_loss, generators, legacy_types
from .runtime import current_device as _current_index
from .sparse import moved_to_device
from .tensor import RemoteTensor

_Tensor = torch.Tensor
_RemoteGenerator = generators.RemoteGenerator


def map_device(device: Any) -> Any:
    """``cuda``/``cuda:N``/``torch.device('cuda', N)`` -> ``remote:N``; anything else unchanged."""
    if isinstance(device, str):
        if not device.startswith("cuda"):
            return device
        device = torch.device(device)
    if isinstance(device, torch.device) and device.type == "cuda":
        return backend.device(_current_index() if device.index is None else device.index)
    return device


def _map_ordinal(device: Any) -> Any:
    """In device positions a bare int is a CUDA ordinal (``x.to(0)``, ``device=1``)."""
    if isinstance(device, int) and not isinstance(device, bool):
        return backend.device(device)
    return map_device(device)


def _tensor_to(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if len(args) > 1:
        args = (args[0], _map_ordinal(args[1]), *args[2:])
    if "device" in kwargs:
        kwargs["device"] = _map_ordinal(kwargs["device"])
    if args[0].layout is not torch.strided:  # a sparse tensor: see sparse.moved_to_device
        moved = moved_to_device(args[0], args[1:], kwargs)
        if moved is not None:
            return moved
    return func(*args, **kwargs)


def _tensor_cuda(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    tensor = args[0]
    device = args[1] if len(args) > 1 else kwargs.pop("device", None)
    target = backend.device(_current_index()) if device is None else _map_ordinal(device)
    non_blocking = args[2] if len(args) > 2 else kwargs.pop("non_blocking", False)
    return _tensor_to(_Tensor.to, (tensor, target), {"non_blocking": non_blocking, **kwargs})


#: The mark :func:`_mark_pinned` sets on a storage's Python object (torch keeps that object for as
#: long as the storage lives, and every view of the storage returns it).
_PINNED = "_libremote_pinned"


def _is_dense_host(tensor: torch.Tensor) -> bool:
    return type(tensor) is not RemoteTensor and tensor.device.type == "cpu" and tensor.layout == torch.strided


def _mark_pinned(tensor: torch.Tensor) -> torch.Tensor:
    setattr(tensor.untyped_storage(), _PINNED, True)
    return tensor


def _pin_memory(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``t.pin_memory()`` as on CUDA: a copy with the same sizes and strides in pinned memory, or
    ``t`` itself if it is pinned already; ``is_pinned()`` is then True for it and its views.

    A CPU build of torch cannot page-lock memory, and libremote need not (the bytes travel over
    the network either way), so the copy is ordinary host memory whose storage is marked pinned.
    Programs see what they see on CUDA: a new tensor that reports ``is_pinned()``."""
    tensor = args[0]
    if isinstance(tensor, RemoteTensor):
        raise RuntimeError(f"cannot pin '{tensor.type()}' only dense CPU tensors can be pinned")
    if not _is_dense_host(tensor):
        return func(*args, **kwargs)
    if getattr(tensor.untyped_storage(), _PINNED, False):
        return tensor
    pinned = torch.empty_strided(tensor.size(), tensor.stride(), dtype=tensor.dtype)
    return _mark_pinned(pinned.copy_(tensor))


def _is_pinned(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    tensor = args[0]
    if isinstance(tensor, RemoteTensor):
        return False
    if not _is_dense_host(tensor):
        return func(*args, **kwargs)
    return getattr(tensor.untyped_storage(), _PINNED, False)


def _record_stream(tensor: torch.Tensor, stream: Any) -> None:
    """``t.record_stream(s)`` protects a tensor's memory from reuse while another stream may
    still read it; a session's work runs in order on one stream on the daemon, so there is
    nothing to protect. (A method on ``torch.Tensor``, not a case of the mode: torch's argument
    parser refuses libremote's stream object before any torch-function handler is asked.)"""
    if tensor.device.type in ("cuda", backend.BACKEND_NAME):
        return None
    return torch._C.TensorBase.record_stream(tensor, stream)


def _tensor_type(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``host_tensor.type(torch.cuda.FloatTensor)``: moved to the remote device (legacy_types)."""
    dtype = args[1] if len(args) > 1 else kwargs.get("dtype")
    if dtype is not None:
        non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
        cast = legacy_types.cast(args[0], dtype, non_blocking)
        if cast is not None:
            return cast
    return func(*args, **kwargs)


_SPECIAL: dict[Any, Callable[..., Any]] = {
    _Tensor.to: _tensor_to,
    _Tensor.cuda: _tensor_cuda,
    _Tensor.pin_memory: _pin_memory,
    _Tensor.is_pinned: _is_pinned,
    _Tensor.type: _tensor_type,
    **attention.HOOKS,
    **ctc_loss.HOOKS,
}


class CudaIsRemote(TorchFunctionMode):
    """The mode that rewrites ``cuda`` device arguments to the remote device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        if kwargs is None:
            kwargs = {}
        special = _SPECIAL.get(func)
        if special is not None:
            return special(func, args, kwargs)
        if kwargs:
            device = kwargs.get("device")
            if device is not None:
                kwargs["device"] = _map_ordinal(device)
            generator = kwargs.get("generator")
            if generator is not None and type(generator) is _RemoteGenerator:
                generators.check_host_call(args, kwargs)  # a host op with a device generator: CUDA's error
            if kwargs.get("pin_memory"):  # torch.empty(..., pin_memory=True): see _pin_memory
                kwargs["pin_memory"] = False
                result = func(*args, **kwargs)
                return _mark_pinned(result) if isinstance(result, _Tensor) and _is_dense_host(result) else result
        return func(*args, **kwargs)


_mode = CudaIsRemote()
_original_bootstrap_inner = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]


def _bootstrap_inner_with_mode(self: threading.Thread) -> None:
    with CudaIsRemote():
        _original_bootstrap_inner(self)


_original_set_default_device = torch.set_default_device
_original_get_default_device = torch.get_default_device


def set_default_device(device: Any) -> None:
    _original_set_default_device(_map_ordinal(device) if device is not None else None)


def get_default_device() -> torch.device:
    device = _original_get_default_device()
    if device.type == backend.BACKEND_NAME:
        return torch.device("cuda", device.index or 0)
    return device


set_default_device.__doc__ = _original_set_default_device.__doc__
get_default_device.__doc__ = _original_get_default_device.__doc__

_entered = False


def enter_mode() -> None:
    """Enter the mode in this thread (idempotent); threads started later enter it themselves
    (``threading.Thread._bootstrap_inner``, replaced in :mod:`.patches`)."""
    global _entered
    if _entered:
        return
    _entered = True
    _mode.__enter__()
