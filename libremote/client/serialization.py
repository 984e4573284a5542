"""``torch.save`` / ``torch.load`` for remote tensors, in CUDA's own file format.

Layer 4, the torch-facing facade.

Saving fetches each remote storage's data and pickles its tensors exactly as torch pickles CUDA
tensors: the storage is recorded with location ``cuda:N``. A checkpoint written through libremote
therefore loads with plain torch on a real GPU machine, and real CUDA checkpoints load here.

Loading: a storage whose location is ``cuda*`` (directly, or through ``map_location="cuda"``) is
read into host memory and marked; when torch rebuilds a tensor on a marked storage, the tensor is
moved to the remote device. ``map_location="cpu"`` keeps everything on the host, as usual.

Shared storages: as on CUDA, ``torch.save`` writes each storage once, and tensors that share one
(tied weights, views) are saved as views of it, so they load sharing it again. While a
``torch.save`` runs (its ``_save``/``_legacy_save`` are wrapped to open a *save scope*), the first
remote tensor of each daemon storage fetches the whole storage once; every tensor of that storage
is then pickled as a view (its own offset, shape, strides) of that one host storage. Outside a
save (plain ``pickle``), each tensor is fetched on its own.
Loading to the remote device likewise uploads each storage once and rebuilds its tensors as views
of it there.
"""

from __future__ import annotations

import collections
import functools
import threading
import weakref
from typing import Any

import torch

from . import backend, runtime, sparse
from .tensor import fetch, storage_of

#: Host storages made by saving remote tensors -> the CUDA location to record for them.
_saved_locations: dict[int, str] = {}
#: Host storages read from ``cuda*`` locations -> the remote device index to move them to.
_loaded_for_device: dict[int, int] = {}
#: Those host storages -> their bytes uploaded to the remote device (a flat uint8 tensor).
_uploaded: dict[int, torch.Tensor] = {}
_original_rebuild_tensor_v2 = torch._utils._rebuild_tensor_v2
_original_save = torch.serialization._save
_original_legacy_save = torch.serialization._legacy_save


def _remember(table: dict[int, Any], storage: Any, value: Any) -> None:
    key = storage._cdata
    table[key] = value
    weakref.finalize(storage, table.pop, key, None)


#: Per thread, while a ``torch.save`` runs: id of a daemon storage identity -> (the identity, kept
#: alive so its id stays unique, and the host copy of the whole storage).
_save_scope = threading.local()


def _saving(save_function: Any) -> Any:
    """``save_function`` (torch's ``_save``/``_legacy_save``) run inside a save scope, so tensors
    sharing a daemon storage are written as views of one storage, as torch writes CUDA ones."""

    @functools.wraps(save_function)
    def save(*args: Any, **kwargs: Any) -> Any:
        outer = getattr(_save_scope, "storages", None)
        _save_scope.storages = {} if outer is None else outer
        try:
            return save_function(*args, **kwargs)
        finally:
            _save_scope.storages = outer

    return save


def _host_storage(tensor: Any) -> torch.UntypedStorage | None:
    """The host copy of ``tensor``'s whole daemon storage, fetched once per save scope; None
    outside a save, or when the storage is not a whole number of ``tensor``'s elements."""
    storages = getattr(_save_scope, "storages", None)
    identity = storage_of(tensor)
    if storages is None or identity.nbytes % tensor.element_size():
        return None
    known = storages.get(id(identity))
    if known is None:
        with torch.no_grad():
            whole = torch.as_strided(tensor.detach(), (identity.nbytes // tensor.element_size(),), (1,), 0)
        host = fetch(whole).untyped_storage()
        _remember(_saved_locations, host, f"cuda:{tensor._device_index}")
        known = storages[id(identity)] = (identity, host)
    return known[1]


def _host_copy(tensor: Any) -> torch.Tensor:
    """``tensor``'s data on the host: a view of its whole storage's host copy inside a save
    (same offset, shape and strides as on the device), else a copy of the tensor alone."""
    storage = _host_storage(tensor)
    if storage is None:
        host = fetch(tensor.detach())
        _remember(_saved_locations, host.untyped_storage(), f"cuda:{tensor._device_index}")
        return host
    return torch.empty(0, dtype=tensor.dtype).set_(storage, tensor.storage_offset(), tensor.shape, tensor.stride())


def reduce_remote_tensor(tensor: Any) -> Any:
    """``RemoteTensor.__reduce_ex__``: pickle as a CUDA tensor (Parameter stays Parameter)."""
    host = _host_copy(tensor)
    if getattr(tensor, "_is_param", False):
        return (torch._utils._rebuild_parameter, (host, tensor.requires_grad, collections.OrderedDict()))
    if tensor.requires_grad:
        host.requires_grad_(True)
    return host.__reduce_ex__(2)


def reduce_sparse(tensor: Any) -> Any:
    """Pickle as torch pickles a CUDA sparse tensor: torch's own sparse reduction of a host copy
    whose parts' storages are recorded at ``cuda:N``, as :func:`reduce_remote_tensor` records a
    dense one's (``sparse.RemoteSparseTensor.__reduce_ex__``)."""
    host = sparse.to_host(tensor)
    for part in sparse._parts(host):
        _remember(_saved_locations, part.untyped_storage(), f"cuda:{tensor._device_index}")
    if tensor.requires_grad:
        host.requires_grad_(True)
    return host.__reduce_ex__(2)


def _tag(storage: Any) -> str | None:
    return _saved_locations.get(getattr(storage, "_cdata", None))


def _deserialize(storage: Any, location: str) -> Any:
    if not location.startswith("cuda"):
        return None
    index = torch.device(location).index
    _remember(_loaded_for_device, storage, runtime.current_device() if index is None else index)
    return storage


def _rebuild_tensor_v2(storage: Any, storage_offset: int, size: Any, stride: Any, requires_grad: bool,
                       backward_hooks: Any, metadata: Any = None) -> torch.Tensor:
    tensor = _original_rebuild_tensor_v2(storage, storage_offset, size, stride, False, backward_hooks, metadata)
    index = _loaded_for_device.get(storage._untyped_storage._cdata)
    if index is not None:
        tensor = _on_device(tensor, storage._untyped_storage, index)
    if requires_grad:
        tensor.requires_grad_(True)
    return tensor


def _on_device(tensor: torch.Tensor, storage: torch.UntypedStorage, index: int) -> torch.Tensor:
    """``tensor`` (on the host ``storage`` being loaded) on remote device ``index``, as a view of
    that storage uploaded once: tensors that shared a storage in the file share one again."""
    if storage.nbytes() % tensor.element_size():
        return tensor.to(backend.device(index))
    uploaded = _uploaded.get(storage._cdata)
    if uploaded is None:
        uploaded = torch.empty(0, dtype=torch.uint8).set_(storage).to(backend.device(index))
        _remember(_uploaded, storage, uploaded)
    with torch.no_grad():
        view = torch.as_strided(uploaded.view(tensor.dtype), tensor.shape, tensor.stride(), tensor.storage_offset())
    # detach(): same storage, but no autograd view of the upload (``_base`` is None, as for a
    # tensor torch.load rebuilds), so the program may use it in place like any loaded tensor.
    return view.detach()


_rebuild_tensor_v2.__module__ = _original_rebuild_tensor_v2.__module__
_rebuild_tensor_v2.__qualname__ = _original_rebuild_tensor_v2.__qualname__
_rebuild_tensor_v2.__name__ = _original_rebuild_tensor_v2.__name__


#: What replaces torch.serialization's ``_save`` and ``_legacy_save`` (see :mod:`.patches`).
_save = _saving(_original_save)
_legacy_save = _saving(_original_legacy_save)


def register() -> None:
    """Register the location tagger and loader for ``cuda`` storages with torch.serialization,
    once the names in :mod:`.patches` are in place. (torch cannot unregister a package.)"""
    # Priority 5: ahead of the CPU tagger (10), which would call our host copies "cpu", and
    # of CUDA's deserializer (20), which cannot run on a CPU build.
    torch.serialization.register_package(5, _tag, _deserialize)
    from torch import _weights_only_unpickler

    # The weights-only unpickler's allowed globals may have been read before _rebuild_tensor_v2 was ours.
    _weights_only_unpickler._get_allowed_globals.cache_clear()
