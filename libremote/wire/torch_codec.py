"""The extension types that name torch objects, for the peers that hold tensors (client, workers).

dtypes, layouts and memory formats travel by name (``"float32"``), so a client and a worker on
different torch versions agree on them; small CPU tensors (a 0-dim scalar argument) travel inside
the header. :func:`unpackb` decodes all of :mod:`.codec`'s extension types plus these.
"""

from __future__ import annotations

import ctypes
from typing import Any

import msgpack
import torch

from . import codec
from .codec import Ext, ProtocolError

DTYPES: dict[str, torch.dtype] = {
    name: value for name, value in vars(torch).items() if isinstance(value, torch.dtype)
}
_DTYPE_NAMES: dict[torch.dtype, str] = {}
for _name, _dtype in DTYPES.items():
    # Prefer the canonical name ("float32" over the alias "float") as str(dtype) spells it.
    if str(_dtype) == f"torch.{_name}":
        _DTYPE_NAMES[_dtype] = _name
LAYOUTS: dict[str, torch.layout] = {
    "strided": torch.strided,
    "sparse_coo": torch.sparse_coo,
    "sparse_csr": torch.sparse_csr,
    "sparse_csc": torch.sparse_csc,
    "sparse_bsr": torch.sparse_bsr,
    "sparse_bsc": torch.sparse_bsc,
}
_LAYOUT_NAMES = {value: name for name, value in LAYOUTS.items()}
MEMORY_FORMATS: dict[str, torch.memory_format] = {
    "contiguous_format": torch.contiguous_format,
    "channels_last": torch.channels_last,
    "channels_last_3d": torch.channels_last_3d,
    "preserve_format": torch.preserve_format,
}
_MEMORY_FORMAT_NAMES = {value: name for name, value in MEMORY_FORMATS.items()}

_dtype_exts = {dtype: msgpack.ExtType(int(Ext.DTYPE), name.encode()) for dtype, name in _DTYPE_NAMES.items()}
_memory_format_exts = {fmt: msgpack.ExtType(int(Ext.MEMORY_FORMAT), name.encode()) for fmt, name in _MEMORY_FORMAT_NAMES.items()}
_layout_exts = {layout: msgpack.ExtType(int(Ext.LAYOUT), name.encode()) for layout, name in _LAYOUT_NAMES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]


def dtype_ext(dtype: torch.dtype) -> msgpack.ExtType:
    return _dtype_exts[dtype]


def layout_ext(layout: torch.layout) -> msgpack.ExtType:
    try:
        return _layout_exts[layout]
    except KeyError:
        raise NotImplementedError(f"libremote supports strided and sparse tensors only, not {layout}") from None


def memory_format_ext(fmt: torch.memory_format) -> msgpack.ExtType:
    return _memory_format_exts[fmt]


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (any dtype, bfloat16 included).

    The view keeps the tensor alive (ZeroMQ may send it after the caller returns). It does not
    go through ``Tensor.numpy()``, which would mark the tensor's storage as never resizable.
    """
    flat = tensor.reshape(-1)
    nbytes = flat.numel() * flat.element_size()
    if nbytes == 0:
        return memoryview(b"")
    buffer = (ctypes.c_char * nbytes).from_address(flat.data_ptr())
    buffer._owner = flat  # type: ignore[attr-defined]
    return memoryview(buffer).cast("B")


def tensor_from_bytes(buffer: Any, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    """A CPU tensor that views ``buffer`` (kept alive by the tensor) or, when the buffer is not
    aligned for ``dtype``, a copy of it. Checks the length."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = 1
    for size in shape:
        if size < 0:
            raise ProtocolError(f"negative size in shape {shape}")
        numel *= size
    view = memoryview(buffer)
    if view.nbytes != numel * itemsize:
        raise ProtocolError(
            f"a {dtype} tensor of shape {list(shape)} needs {numel * itemsize} bytes, "
            f"the frame holds {view.nbytes}"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(view, dtype=torch.uint8)
    if flat.data_ptr() % itemsize:
        # ZeroMQ frames start wherever its buffers put them (large ones 8 bytes in); kernels need
        # natural alignment (complex128 crashes without it), so such a frame is copied into a
        # fresh, aligned tensor.
        flat = flat.clone()
    return flat.view(dtype).view(shape)


def inline_tensor_ext(tensor: torch.Tensor) -> msgpack.ExtType:
    tensor = tensor.detach().contiguous()
    payload = codec.packb([_DTYPE_NAMES[tensor.dtype], list(tensor.shape), bytes(tensor_bytes(tensor))])
    return msgpack.ExtType(int(Ext.TENSOR), payload)


def _inline_tensor(data: bytes) -> torch.Tensor:
    dtype_str, shape, raw = msgpack.unpackb(data, raw=False, **codec.UNPACK_LIMITS)
    # Copy: the header buffer is not ours to keep.
    return tensor_from_bytes(bytearray(raw), DTYPES[dtype_str], shape).clone()


def tensor_meta(tensor: torch.Tensor) -> list[Any]:
    """What the client needs to build a wrapper for a tensor the worker made: ``[dtype, shape,
    strides, storage offset]``, or for a sparse tensor ``[dtype, shape, layout, sparse dims,
    dense dims, nnz, coalesced (COO; else nil), index dtype, blocksize (BSR/BSC; else [])]``."""
    layout = tensor.layout
    if layout is torch.strided:
        return [dtype_ext(tensor.dtype), list(tensor.shape), list(tensor.stride()), tensor.storage_offset()]
    if layout is torch.sparse_coo:
        coalesced, index_dtype, blocksize = tensor.is_coalesced(), tensor._indices().dtype, []
    else:
        coalesced = None
        index_dtype = (tensor.crow_indices() if layout in (torch.sparse_csr, torch.sparse_bsr) else tensor.ccol_indices()).dtype
        batch_dims = tensor.dim() - tensor.sparse_dim() - tensor.dense_dim()
        blocksize = list(tensor.values().shape[batch_dims + 1:batch_dims + 3]) if layout in (torch.sparse_bsr, torch.sparse_bsc) else []
    return [dtype_ext(tensor.dtype), list(tensor.shape), layout_ext(layout), tensor.sparse_dim(), tensor.dense_dim(),
            tensor._nnz(), coalesced, dtype_ext(index_dtype), blocksize]


_hook = codec.ext_hook_for({
    **codec.BASE_DECODERS,
    Ext.DTYPE: lambda data: DTYPES[data.decode()],
    Ext.LAYOUT: lambda data: LAYOUTS[data.decode()],
    Ext.MEMORY_FORMAT: lambda data: MEMORY_FORMATS[data.decode()],
    Ext.TENSOR: _inline_tensor,
})


def unpackb(data: bytes | memoryview, *, max_bytes: int = codec.MAX_HEADER_BYTES) -> Any:
    """:func:`.codec.unpackb` with the torch extension types decoded to torch objects."""
    return codec.unpackb(data, max_bytes=max_bytes, ext_hook=_hook)
