"""Sparse tensors (COO, CSR, CSC, BSR, BSC) under a session's handles, and what keeps them safe.

A sparse tensor is a strided tensor of indices (COO: ``indices``, sparse_dim x nnz; compressed
layouts: ``crow_indices``/``ccol_indices`` and ``col_indices``/``row_indices``) and one of values,
plus metadata (size, sparse and dense dims, COO's ``is_coalesced`` flag). Its kernels trust the
indices: ATen checks them only where ``torch.sparse.check_sparse_tensor_invariants`` is on (off by
default), so a COO index past the size, a ``crow_indices`` that runs backwards or a false
``is_coalesced`` makes ``mm``, ``coalesce`` or ``to_dense`` read and write outside their buffers
(``_sparse_coo_tensor_with_dims_and_tensors`` and ``alias_into_sparse`` take the indices as they
are, aten/src/ATen/native/sparse/SparseTensor.cpp). The worker keeps one invariant instead:

**every sparse tensor under a handle passes torch's own invariant checks**, which it holds by

* validating each sparse tensor before it gets a handle (:func:`invalid`: torch's
  ``_validate_sparse_coo_tensor_args`` with its ``is_coalesced`` claim, or
  ``_validate_sparse_compressed_tensor_args``), whatever op made it: a constructor with a client's
  indices, an upload, or a kernel;
* validating each sparse tensor an op wrote in place again after it (``_coalesced_(True)`` on
  unsorted indices, ``sparse_resize_``, ``copy_``): one that fails is dropped and its handle
  poisoned, as a tensor an op grew past the quota is (session.py);
* never letting a strided handle share a storage with a sparse tensor's *indices*, so nobody can
  write them after they were checked: a sparse result whose indices alias a tensor the session
  already holds (constructors alias their arguments) gets a private copy of them, and a strided
  result that views a sparse tensor's index storage (``indices()``, ``crow_indices()`` and views
  of them) is stored as a copy. Values may be shared (``values().mul_(2)`` works as in torch):
  no value is ever used as an address.

Memory: a sparse handle is charged for each storage its parts use (memory.py), so quotas, peaks
and the device budget see indices and values alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

#: The sparse layouts the daemon keeps (mkldnn and jagged layouts stay refused).
SPARSE_LAYOUTS = frozenset({torch.sparse_coo, torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr,
                            torch.sparse_bsc})
_ROW_COMPRESSED = frozenset({torch.sparse_csr, torch.sparse_bsr})


def is_sparse(tensor: torch.Tensor) -> bool:
    return tensor.layout is not torch.strided and tensor.layout in SPARSE_LAYOUTS


def index_parts(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The strided tensors of ``tensor``'s indices (COO: one; compressed layouts: two)."""
    if tensor.layout is torch.sparse_coo:
        return [tensor._indices()]
    if tensor.layout in _ROW_COMPRESSED:
        return [tensor.crow_indices(), tensor.col_indices()]
    return [tensor.ccol_indices(), tensor.row_indices()]


def values_part(tensor: torch.Tensor) -> torch.Tensor:
    return tensor._values() if tensor.layout is torch.sparse_coo else tensor.values()


def parts(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every strided tensor a sparse tensor is made of: its indices, then its values."""
    return [*index_parts(tensor), values_part(tensor)]


def invalid(tensor: torch.Tensor) -> str | None:
    """Why ``tensor`` breaks torch's sparse invariants (indices outside the size, negative,
    compressed indices that do not count up to nnz, a false ``is_coalesced``, mismatched nnz,
    dims or dtypes), or None. torch's own checks (on a GPU: a sync, and kernels over nnz)."""
    try:
        if tensor.layout is torch.sparse_coo:
            torch._validate_sparse_coo_tensor_args(tensor._indices(), tensor._values(), list(tensor.shape),
                                                   tensor.is_coalesced())
        else:
            compressed, plain = index_parts(tensor)
            torch._validate_sparse_compressed_tensor_args(compressed, plain, tensor.values(), list(tensor.shape),
                                                          tensor.layout)
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        return str(exc).strip().split("\n")[0][:500] or type(exc).__name__
    return None


def unstorable(tensor: torch.Tensor, devices: Sequence[torch.device]) -> str | None:
    """Why the daemon will not keep the sparse ``tensor`` under a handle, or None: its parts must
    be strided tensors with storage on the session's devices (what the memory account charges),
    and the whole must pass torch's invariant checks."""
    if tensor.device not in devices:
        return f"is on {tensor.device}, which is not one of this session's devices"
    for part in parts(tensor):
        if part.layout is not torch.strided or part.is_quantized or part.device != tensor.device:
            return f"is a {tensor.layout} tensor whose parts are not strided tensors on {tensor.device}"
        try:
            part.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            return f"is a {tensor.layout} tensor whose parts have no storage"
    reason = invalid(tensor)
    if reason is not None:
        return f"is a {tensor.layout} tensor that fails torch's invariant checks ({reason})"
    return None


def with_private_indices(tensor: torch.Tensor) -> torch.Tensor:
    """The same sparse tensor over copies of its indices (its values shared)."""
    with torch.no_grad():
        copy: torch.Tensor  # (torch.ops' overloads are untyped)
        if tensor.layout is torch.sparse_coo:
            copy = torch.ops.aten._sparse_coo_tensor_with_dims_and_tensors(
                tensor.sparse_dim(), tensor.dense_dim(), list(tensor.shape), tensor._indices().clone(),
                tensor._values(), dtype=tensor.dtype, layout=tensor.layout, device=tensor.device,
                is_coalesced=tensor.is_coalesced())
            return copy
        compressed, plain = index_parts(tensor)
        copy = torch.ops.aten.sparse_compressed_tensor.comp_plain_value_size(
            compressed.clone(), plain.clone(), tensor.values(), list(tensor.shape), dtype=tensor.dtype,
            layout=tensor.layout, device=tensor.device)
        return copy


def storage_key(tensor: torch.Tensor) -> int:
    key: int = tensor.untyped_storage()._cdata  # (the storage's address: torch leaves _cdata untyped)
    return key


class IndexStorages:
    """Which storages hold the indices of the session's sparse handles (storage key -> how many
    handles), so that no strided handle ever shares one. Empty in a session without sparse
    tensors, which then pays one truth test per stored result."""

    __slots__ = ("counts", "of_handle")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.of_handle: dict[int, tuple[int, ...]] = {}

    def __bool__(self) -> bool:
        return bool(self.counts)

    def admit(self, tensor: torch.Tensor, charged: Callable[[int], bool]) -> torch.Tensor:
        """A valid sparse result as it may be stored: over private indices if any of its index
        storages is one the session holds (``charged``) other than as another sparse tensor's
        indices (``sparse_coo_tensor(i, v)`` aliases ``i``, which the client can still write)."""
        for part in index_parts(tensor):
            key = storage_key(part)
            if key not in self.counts and charged(key):
                return with_private_indices(tensor)
        return tensor

    def strided(self, tensor: torch.Tensor) -> torch.Tensor:
        """A strided result as it may be stored: a copy if it views a sparse tensor's indices."""
        if storage_key(tensor) in self.counts:
            with torch.no_grad():
                return tensor.clone()
        return tensor

    def add(self, handle: int, tensor: torch.Tensor) -> None:
        keys = tuple(storage_key(part) for part in index_parts(tensor))
        self.of_handle[handle] = keys
        for key in keys:
            self.counts[key] = self.counts.get(key, 0) + 1

    def remove(self, handle: int) -> None:
        for key in self.of_handle.pop(handle, ()):
            left = self.counts[key] - 1
            if left:
                self.counts[key] = left
            else:
                del self.counts[key]


class _Handle(Protocol):
    """A decoded handle (the wire's ``HandleRef``, which this module does not import)."""

    handle: int


def written_sparse(written: Sequence[tuple[str, Any]], args: list[Any], kwargs: dict[str, Any], wire_args: list[Any],
                   wire_kwargs: dict[str, Any], handle_type: type[_Handle]) -> list[tuple[int, torch.Tensor]]:
    """(handle, tensor) of each sparse tensor among the arguments an op wrote (``written``: as
    ``OpEntry.written_arguments``)."""
    found = []
    for where, key in written:
        if where == "arg":
            value = args[key] if key < len(args) else None
            wire = wire_args[key] if key < len(wire_args) else None
        else:
            value, wire = kwargs.get(key), wire_kwargs.get(key)
        if isinstance(value, torch.Tensor) and isinstance(wire, handle_type) and is_sparse(value):
            found.append((wire.handle, value))
    return found
