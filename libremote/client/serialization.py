"""``torch.save`` / ``torch.load`` for remote tensors, in CUDA's own file format.

Saving fetches each remote tensor's data and pickles it exactly as torch pickles a CUDA tensor:
the storage is recorded with location ``cuda:N``. A checkpoint written through libremote
therefore loads with plain torch on a real GPU machine, and real CUDA checkpoints load here.

Loading: a storage whose location is ``cuda*`` (directly, or through ``map_location="cuda"``) is
read into host memory and marked; when torch rebuilds a tensor on a marked storage, the tensor is
moved to the remote device. ``map_location="cpu"`` keeps everything on the host, as usual.
Limitation: views that shared a storage are saved as separate tensors.
"""

from __future__ import annotations

import collections
import weakref
from typing import Any

import torch

from . import backend

#: Host storages made by saving remote tensors -> the CUDA location to record for them.
_saved_locations: dict[int, str] = {}
#: Host storages read from ``cuda*`` locations -> the remote device index to move them to.
_loaded_for_device: dict[int, int] = {}
_original_rebuild_tensor_v2 = torch._utils._rebuild_tensor_v2


def _remember(table: dict[int, Any], storage: Any, value: Any) -> None:
    key = storage._cdata
    table[key] = value
    weakref.finalize(storage, table.pop, key, None)


def reduce_remote_tensor(tensor: Any) -> Any:
    """``RemoteTensor.__reduce_ex__``: pickle as a CUDA tensor (Parameter stays Parameter)."""
    from .sync import fetch

    host = fetch(tensor.detach())
    _remember(_saved_locations, host.untyped_storage(), f"cuda:{tensor._device_index}")
    if getattr(tensor, "_is_param", False):
        return (torch._utils._rebuild_parameter, (host, tensor.requires_grad, collections.OrderedDict()))
    if tensor.requires_grad:
        host.requires_grad_(True)
    return host.__reduce_ex__(2)


def _tag(storage: Any) -> str | None:
    return _saved_locations.get(getattr(storage, "_cdata", None)) if _active else None


_active = False


def _deserialize(storage: Any, location: str) -> Any:
    if not _active or not location.startswith("cuda"):
        return None
    from . import cuda_api

    index = torch.device(location).index
    _remember(_loaded_for_device, storage, cuda_api.current_device() if index is None else index)
    return storage


def _rebuild_tensor_v2(storage: Any, storage_offset: int, size: Any, stride: Any, requires_grad: bool,
                       backward_hooks: Any, metadata: Any = None) -> torch.Tensor:
    tensor = _original_rebuild_tensor_v2(storage, storage_offset, size, stride, False, backward_hooks, metadata)
    index = _loaded_for_device.get(storage._untyped_storage._cdata)
    if index is not None:
        tensor = tensor.to(backend.device(index))
    if requires_grad:
        tensor.requires_grad_(True)
    return tensor


_rebuild_tensor_v2.__module__ = _original_rebuild_tensor_v2.__module__
_rebuild_tensor_v2.__qualname__ = _original_rebuild_tensor_v2.__qualname__
_rebuild_tensor_v2.__name__ = _original_rebuild_tensor_v2.__name__


_registered = False


def install() -> None:
    global _active, _registered
    _active = True
    if not _registered:
        # Priority 5: ahead of the CPU tagger (10), which would call our host copies "cpu", and
        # of CUDA's deserializer (20), which cannot run on a CPU build.
        torch.serialization.register_package(5, _tag, _deserialize)
        _registered = True
    torch._utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    from torch import _weights_only_unpickler

    _weights_only_unpickler._get_allowed_globals.cache_clear()


def uninstall() -> None:
    # torch cannot unregister a package; the tagger and deserializer stay but do nothing.
    global _active
    _active = False
    torch._utils._rebuild_tensor_v2 = _original_rebuild_tensor_v2
    from torch import _weights_only_unpickler

    _weights_only_unpickler._get_allowed_globals.cache_clear()
