"""Sparse remote tensors: COO, CSR, CSC, BSR and BSC tensors that live on the daemon.

Layer 2, remote tensors: the tensor, its metadata, its parts' way between host and daemon, its
repr. Its op path is :mod:`.sparse_dispatch` and its pickling :func:`.serialization.reduce_sparse`
(given to it by :mod:`.registration`).

Representation. A sparse remote tensor is a :class:`RemoteSparseTensor`, a subclass of the
wrapper :class:`~.tensor.RemoteTensor` made with ``_make_wrapper_subclass(..., layout=...)``: one
handle on the daemon names the whole sparse tensor (there a real ``torch.sparse_coo`` or
compressed tensor). A wrapper subclass carries a sparse layout cleanly, which is why it was
chosen over a Python object composed of remote indices and values: the layout decides the C++
dispatch keys (``SparsePrivateUse1`` for COO, ``SparseCsrPrivateUse1`` for the compressed ones,
c10/core/TensorImpl.h ``layout()``), so ``t.is_sparse``, ``t.layout``, ``t.is_sparse_csr`` and
autograd's sparse paths (``mm``'s backward takes ``mat1.t()`` of a sparse ``mat1``;
``validate_outputs`` compares layouts) behave as for a CUDA sparse tensor, and every aten op on it
still reaches ``__torch_dispatch__``. Compressed layouts have no layout of their own in the key
set (``layout_impl`` is virtual there, and a wrapper's is unimplemented), so they are made with
``dispatch_layout=True`` and ``prim.layout`` is answered by :mod:`.sparse_dispatch`. A composed Python object would
not be a ``torch.Tensor`` to autograd, ``torch.sparse.mm`` or ``nn.Module``: every op would need
a ``__torch_function__`` override of its own.

Metadata. A sparse tensor's metadata (:class:`SparseSpec`: layout, dtype, size, sparse and dense
dims, nnz, the coalesced flag, index dtype, blocksize) depends on its data for most ops
(``coalesce``, ``to_sparse``, sparse + sparse), and torch's meta kernels cannot say it:
``SparseMeta`` has no kernel for ``mm``, ``mul`` or ``_coalesce``, and where it has one it loses
nnz (``clone``, ``t``: nnz 0; torch/_subclasses/meta_utils.py builds meta sparse tensors with
nnz 0 on purpose, and FakeTensor never caches a sparse output, fake_tensor.py
``_BypassDispatchCache("sparse output")``). So an op with a sparse result runs synchronously and
takes the daemon's answer; ``_nnz``, ``sparse_dim``, ``dense_dim``, ``is_coalesced`` and the
layout are answered from the spec (:mod:`.sparse_dispatch`). Ops on sparse arguments with dense results (``mm``,
``addmm``, ``to_dense``) wait for the daemon the first time per argument signature (which
includes nnz) and stream afterwards with the metadata it gave: a GCN step streams its
sparse-dense products; only ``adj.t()`` in backward waits.

Host <-> daemon: uploads send indices and values as strided tensors and build the sparse tensor
there with its constructor op (the daemon checks it with torch's invariant checks before it
keeps it, server/worker/sparse.py); ``.cpu()`` fetches the parts and builds the host tensor.
``torch.save`` writes torch's own sparse pickle with the parts' storages at ``cuda:N`` (a CUDA
checkpoint), and ``torch.load`` rebuilds through ``torch.sparse_coo_tensor`` and friends.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from . import backend
from .tensor import RemoteTensor, _HandleRef, _StorageIdentity, fetch

aten = torch.ops.aten

_COMPRESSED = {
    torch.sparse_csr: (aten.crow_indices.default, aten.col_indices.default),
    torch.sparse_bsr: (aten.crow_indices.default, aten.col_indices.default),
    torch.sparse_csc: (aten.ccol_indices.default, aten.row_indices.default),
    torch.sparse_bsc: (aten.ccol_indices.default, aten.row_indices.default),
}
LAYOUTS = frozenset({torch.sparse_coo, *_COMPRESSED})


class SparseSpec(NamedTuple):
    """What the client knows of a sparse remote tensor (the daemon's answer)."""

    layout: torch.layout
    dtype: torch.dtype
    shape: tuple[int, ...]
    sparse_dim: int
    dense_dim: int
    nnz: int
    coalesced: bool | None  # COO only
    index_dtype: torch.dtype
    blocksize: tuple[int, ...]  # BSR/BSC only


def spec_from_wire(tensor_meta: list[Any]) -> SparseSpec:
    """A spec from a sparse result's metadata (libremote_wire.torch_codec.tensor_meta)."""
    dtype, shape, layout, sparse_dim, dense_dim, nnz, coalesced, index_dtype, blocksize = tensor_meta
    return SparseSpec(layout, dtype, tuple(shape), sparse_dim, dense_dim, nnz, coalesced, index_dtype, tuple(blocksize))


class RemoteSparseTensor(RemoteTensor):
    """A sparse tensor on a libremote daemon. Shown to the program as a ``cuda`` sparse tensor."""

    _spec: SparseSpec  # type: ignore[assignment]

    @staticmethod
    def __new__(cls, spec: SparseSpec, ref: _HandleRef, device_index: int = 0,
                base: torch.Tensor | None = None) -> RemoteSparseTensor:
        def make() -> Any:
            return torch.Tensor._make_wrapper_subclass(
                cls, spec.shape, dtype=spec.dtype, layout=spec.layout, device=backend.device(device_index),
                requires_grad=False, dispatch_layout=spec.layout is not torch.sparse_coo)

        if base is not None and base.is_inference() != torch.is_inference_mode_enabled():
            with torch._C._InferenceMode(base.is_inference()):
                tensor = make()
        else:
            tensor = make()
        tensor._ref = ref
        tensor._spec = spec
        tensor._device_index = device_index
        # Views of a sparse tensor (its values) share no storage identity with it: the daemon keeps
        # index accessors' results as copies (server/worker/sparse.py).
        tensor._storage = _StorageIdentity(0, device_index)
        return tensor

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        return _dispatch(func, args, kwargs or {})

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        return sparse_repr(self)

    def data_ptr(self) -> int:  # type: ignore[override]
        raise RuntimeError("Cannot access data pointer of Tensor that doesn't have storage")

    def untyped_storage(self) -> Any:  # type: ignore[override]
        raise RuntimeError(f"Cannot access storage of {'SparseTensorImpl' if self.is_sparse else 'SparseCsrTensorImpl'}")

    def __reduce_ex__(self, protocol: int) -> Any:
        return _reduce(self)


#: What a sparse remote tensor takes from the layers above, as :class:`~.tensor.RemoteTensor`
#: does (:func:`.tensor.bind`): its op path (:func:`.sparse_dispatch.dispatch`) and its pickling
#: (:func:`.serialization.reduce_sparse`), bound once by :func:`.registration.register`.
_dispatch: Any = None
_reduce: Any = None


def bind(dispatch: Any, reduce: Any) -> None:
    """Give sparse remote tensors their op path and their pickling (see :data:`_dispatch`)."""
    global _dispatch, _reduce
    _dispatch, _reduce = dispatch, reduce


def adopt(spec: SparseSpec, handle: int, session: Any, index: int) -> RemoteSparseTensor:
    """A sparse result of a synchronous op, whose handle was allocated before the call."""
    return RemoteSparseTensor(spec, _HandleRef(handle, session), index)


def set_spec(tensor: RemoteSparseTensor, spec: SparseSpec) -> None:
    """``tensor`` after an op changed it in place (``copy_``, ``add_``, ``_coalesced_``,
    ``sparse_resize_``): the daemon's new metadata."""
    if spec.shape != tensor._spec.shape or spec.layout is not tensor._spec.layout or spec.dtype != tensor.dtype:
        template = RemoteSparseTensor(spec, tensor._ref, tensor._device_index, tensor)
        torch._C.TensorBase.data.__set__(tensor, template)
    tensor._spec = spec


# ----------------------------------------------------------------------------------------------
# Host <-> daemon
# ----------------------------------------------------------------------------------------------
def _parts(tensor: torch.Tensor) -> list[Any]:
    """A sparse tensor's indices and values (as ops on it: remote tensors for a remote one)."""
    if tensor.layout is torch.sparse_coo:
        return [aten._indices.default(tensor), aten._values.default(tensor)]
    compressed, plain = _COMPRESSED[tensor.layout]
    return [compressed(tensor), plain(tensor), aten.values.default(tensor)]


def _build(layout: torch.layout, parts: list[torch.Tensor], shape: Any, dtype: torch.dtype, device: Any,
           coalesced: bool | None, sparse_dim: int, dense_dim: int) -> torch.Tensor:
    if layout is torch.sparse_coo:
        indices, values = parts
        return aten._sparse_coo_tensor_with_dims_and_tensors.default(
            sparse_dim, dense_dim, list(shape), indices, values, dtype=dtype, layout=layout, device=device,
            is_coalesced=coalesced)
    compressed, plain, values = parts
    return aten.sparse_compressed_tensor.comp_plain_value_size(
        compressed, plain, values, list(shape), dtype=dtype, layout=layout, device=device)


def to_host(tensor: RemoteSparseTensor) -> torch.Tensor:
    """The sparse tensor's data as a new host sparse tensor (its parts fetched)."""
    with torch.no_grad():
        parts = [fetch(part) for part in _parts(tensor)]
    spec = tensor._spec
    return _build(spec.layout, parts, spec.shape, spec.dtype, torch.device("cpu"), spec.coalesced,
                  spec.sparse_dim, spec.dense_dim)


def moved_to_device(tensor: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``tensor.to(*args, **kwargs)`` when ``tensor`` is a host sparse tensor going to the remote
    device: uploaded by parts (:func:`upload`); None otherwise. (Not left to torch: the CPU
    kernel of ``_to_copy`` for compressed layouts uploads the parts and makes the sparse tensor
    in C++, never dispatching a constructor the daemon could check.)"""
    if type(tensor) is not torch.Tensor or tensor.layout not in LAYOUTS or tensor.device.type != "cpu":
        return None
    device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
    if device is None or device.type != backend.BACKEND_NAME:
        return None
    return upload(tensor, device.index or 0, dtype)


def upload(source: torch.Tensor, device_index: int, dtype: torch.dtype | None = None) -> RemoteSparseTensor:
    """``host_sparse.to(remote)``: its parts uploaded, the sparse tensor built (and checked) on
    the daemon."""
    device = backend.device(device_index)
    parts = [part.to(device) for part in _parts(source.detach())]
    dtype = dtype or source.dtype
    if parts[-1].dtype != dtype:
        parts[-1] = parts[-1].to(dtype)
    return _build(source.layout, parts, source.shape, dtype, device,
                  source.is_coalesced() if source.layout is torch.sparse_coo else None,
                  source.sparse_dim(), source.dense_dim())


# ----------------------------------------------------------------------------------------------
# Printing
# ----------------------------------------------------------------------------------------------
def sparse_repr(tensor: RemoteSparseTensor) -> str:
    """torch's repr of a CUDA sparse tensor: the contents laid out from a host copy, the
    suffixes (device, size, nnz, dtype, layout, grad_fn) from the tensor itself."""
    from torch._tensor_str import _str, _tensor_str

    host = to_host(tensor)
    indent = len("tensor(")
    names = ("indices", "values") if host.layout is torch.sparse_coo else {
        torch.sparse_csr: ("crow_indices", "col_indices", "values"),
        torch.sparse_bsr: ("crow_indices", "col_indices", "values"),
        torch.sparse_csc: ("ccol_indices", "row_indices", "values"),
        torch.sparse_bsc: ("ccol_indices", "row_indices", "values"),
    }[host.layout]
    lines = []
    for name, part in zip(names, _parts(host)):
        prefix = f"{name}=tensor("
        text = _tensor_str(part, indent + len(prefix))
        if part.numel() == 0:
            text += ", size=" + str(tuple(part.shape))
        lines.append(prefix + text + ")")
    contents = (",\n" + " " * indent).join(lines)
    text = _str(tensor, tensor_contents=contents)
    # torch lays the suffixes out under a subclass's name ("RemoteSparseTensor("); a CUDA
    # tensor's repr starts "tensor(".
    prefix = type(tensor).__name__ + "("
    head, _, tail = text.partition(contents)
    if not head.startswith(prefix):
        return text
    return "tensor(" + head[len(prefix):] + contents + tail.replace("\n" + " " * len(prefix), "\n" + " " * indent)
