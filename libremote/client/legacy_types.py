"""The legacy tensor-type API for the remote device: ``torch.cuda.FloatTensor`` and friends.

Layer 2, remote tensors: ``RemoteTensor.type`` names and casts through it; :mod:`.patches` puts
its classes in ``torch.cuda``.

Older programs (and libraries written for them) still build tensors with
``torch.cuda.FloatTensor(3)`` or ``torch.cuda.LongTensor([1, 2])``, test
``isinstance(t, torch.cuda.FloatTensor)``, compare ``t.type() == "torch.cuda.FloatTensor"`` and
cast with ``t.type(torch.cuda.HalfTensor)``. On a CPU build of torch the ``torch.cuda`` classes
cannot be instantiated and a remote tensor's ``type()`` names torch's backend (``torch.remote``).
Here each ``torch.cuda.<Name>Tensor`` is a class whose instances are the remote tensors of its
dtype, constructed as torch's host class would construct them and then moved to the device.
"""

from __future__ import annotations

from typing import Any

import torch

from . import backend

#: Legacy class name -> dtype (the ones torch.cuda has).
LEGACY_DTYPES: dict[str, torch.dtype] = {
    "FloatTensor": torch.float32, "DoubleTensor": torch.float64, "HalfTensor": torch.float16,
    "BFloat16Tensor": torch.bfloat16, "ByteTensor": torch.uint8, "CharTensor": torch.int8,
    "ShortTensor": torch.int16, "IntTensor": torch.int32, "LongTensor": torch.int64, "BoolTensor": torch.bool,
}
_NAMES = {dtype: name for name, dtype in LEGACY_DTYPES.items()}


class _CudaTensorType(type):
    """Metaclass of the ``torch.cuda.<Name>Tensor`` classes below."""

    dtype: torch.dtype

    def __instancecheck__(cls, instance: Any) -> bool:
        return isinstance(instance, torch.Tensor) and instance.is_cuda and instance.dtype == cls.dtype

    def __call__(cls, *args: Any, **kwargs: Any) -> torch.Tensor:
        host = getattr(torch, cls.__name__)(*args, **kwargs)  # torch.FloatTensor(3), (data), (size...)
        return host.to(backend.device(torch.cuda.current_device()))


CUDA_TYPES: dict[str, _CudaTensorType] = {
    name: _CudaTensorType(name, (), {"dtype": dtype, "is_cuda": True, "is_sparse": False, "__module__": "torch.cuda"})
    for name, dtype in LEGACY_DTYPES.items()
}


def type_name(tensor: torch.Tensor) -> str:
    """``t.type()`` of a remote tensor, as CUDA names it: ``torch.cuda.FloatTensor``."""
    return f"torch.cuda.{_NAMES.get(tensor.dtype, 'Tensor')}"


def _target(dtype: Any) -> tuple[torch.dtype, bool] | None:
    """(dtype, on the device?) for a legacy type argument (class or dotted name), else None."""
    if isinstance(dtype, str):
        module, _, name = dtype.rpartition(".")
        if name in LEGACY_DTYPES and module in ("torch", "torch.cuda"):
            return LEGACY_DTYPES[name], module == "torch.cuda"
        return None
    if isinstance(dtype, type) and getattr(dtype, "__name__", None) in LEGACY_DTYPES and hasattr(dtype, "dtype"):
        return dtype.dtype, bool(getattr(dtype, "is_cuda", False))
    return None


def cast(tensor: torch.Tensor, dtype: Any, non_blocking: bool = False) -> torch.Tensor | None:
    """``t.type(torch.cuda.HalfTensor)`` / ``t.type("torch.DoubleTensor")``: ``t`` moved and cast
    as torch's ``Tensor.type`` would; None if ``dtype`` is not a legacy type (torch handles it)."""
    target = _target(dtype)
    if target is None:
        return None
    wanted_dtype, on_device = target
    if tensor.dtype == wanted_dtype and tensor.is_cuda == on_device:
        return tensor  # (as torch's: no copy when the type is already right)
    if not on_device:
        device = torch.device("cpu")
    else:  # a remote tensor stays on its device; a host tensor goes to the current one
        device = backend.device(tensor.get_device() if tensor.is_cuda else torch.cuda.current_device())
    return tensor.to(device, wanted_dtype, non_blocking=non_blocking)
