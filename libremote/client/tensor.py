"""RemoteTensor: the client's stand-in for a tensor that lives on the daemon.

Layer 2, remote tensors: the object every layer above makes and reads (and reads the bytes of:
:func:`fetch`). Its op path and its pickling come from above (:func:`bind`).

A wrapper subclass (``_make_wrapper_subclass``): it has shape, strides and dtype but no data; its
``__torch_dispatch__`` forwards every aten op to the daemon (see :mod:`.dispatch`). Its C++ device
is the renamed PrivateUse1 backend (``remote:N``) because a CPU build of torch cannot host a
``cuda`` tensor (the autograd engine aborts), and PrivateUse1 gives autograd a real device to run
backward on. To Python code it reports ``device='cuda:N'`` and ``is_cuda=True``: the program
asked for ``cuda`` and sees ``cuda``.

Lifetime: each tensor holds a :class:`_HandleRef` in its ``__dict__``. When torch finally frees the
Python object (which it keeps alive while C++, e.g. autograd, still holds the tensor), the ref's
``__del__`` queues a FREE for the daemon. Rebinding (``t.data = other``) swaps the ref.

Storage identity: every handle is its own tensor on the daemon, but views share their base's
storage there, as on CUDA. The client mirrors that with a storage identity shared by a tensor
and its views (dispatch gives a view its base's, from the op schema's alias sets).
``untyped_storage()`` returns its :class:`RemoteStorage`, whose stand-in address is the same for
every view and distinct per storage, so checkpoint code that finds tied tensors by
``data_ptr()`` and ``nbytes()`` (safetensors, accelerate) works; ``data_ptr()`` is that address
plus the storage offset, as on CUDA.

Inference mode: whether a tensor is an *inference tensor* is fixed when its C++ TensorImpl is made
(c10/core/TensorImpl.cpp: a TensorImpl constructed while ``InferenceMode`` is on gets no autograd or
ADInplaceOrView keys and no version counter). ATen makes a view's TensorImpl from its base's key set
instead (``alias_with_sizes_and_strides``), so a view of a normal tensor taken inside
``torch.inference_mode()`` is a normal tensor, and a view of an inference tensor taken outside is an
inference tensor. The ADInplaceOrView kernel above us then gives a view of a normal base the base's
version counter (``as_view`` -> ``DifferentiableViewMeta``, torch/csrc/autograd/variable.cpp), which
raises "Cannot set version_counter for inference tensor" if the wrapper we returned was made as an
inference tensor. So a view's wrapper is made with its base's inference-ness (see
:class:`RemoteTensor`'s ``base``), every other tensor with the current mode's, as ATen does.
"""

from __future__ import annotations

import copy
import itertools
import warnings
import weakref
from typing import Any

import torch

from libremote_wire import torch_codec
from libremote_wire.codec import handle_ext
from libremote_wire.messages import Cmd

from . import backend, legacy_types

Spec = tuple  # (dtype, shape tuple, stride tuple, storage offset)

aten = torch.ops.aten

_CUDA_DEVICES: dict[int, torch.device] = {}

#: What a RemoteTensor keeps in its ``__dict__`` about itself (the rest is the program's).
OWN_ATTRIBUTES = frozenset({"_ref", "_spec", "_device_index", "_storage"})


def cuda_device(index: int) -> torch.device:
    device = _CUDA_DEVICES.get(index)
    if device is None:
        device = _CUDA_DEVICES[index] = torch.device("cuda", index)
    return device


class _HandleRef:
    """Owns one daemon handle; releases it when the tensor that holds it is freed."""

    __slots__ = ("id", "session", "wire", "__weakref__")

    def __init__(self, handle: int, session: Any) -> None:
        self.id = handle
        self.session = session
        self.wire = handle_ext(handle)  # how the handle travels as an op argument

    def __del__(self) -> None:
        try:
            self.session.release(self.id)
        except Exception:  # interpreter shutdown: nothing left to free
            pass


#: Stand-in storage addresses are this far apart (the largest storage whose address range does
#: not run into the next storage's), and numbered from 1 to this many, then again from 1.
_ADDRESS_SPACING = 1 << 32
_ADDRESSES = 1 << 30
_storage_numbers = itertools.count()


class _StorageIdentity:
    """One daemon storage as the client knows it, shared by a tensor and its views. Cheap to
    make (every view op's base gets one); its address and its :class:`RemoteStorage` object are
    made the first time a program asks for them."""

    __slots__ = ("nbytes", "device_index", "_address", "_storage")

    def __init__(self, nbytes: int, device_index: int) -> None:
        self.nbytes = nbytes
        self.device_index = device_index
        self._address = 0
        self._storage: RemoteStorage | None = None

    @property
    def address(self) -> int:
        if not self._address:
            self._address = (next(_storage_numbers) % _ADDRESSES + 1) * _ADDRESS_SPACING
        return self._address

    def storage(self) -> RemoteStorage:
        if self._storage is None:
            self._storage = RemoteStorage(self.nbytes, device="meta")
            self._storage._identity = self
        return self._storage

    def grow(self, nbytes: int) -> None:
        """The daemon's storage grew (``resize_``, ``out=``): its size here follows."""
        if nbytes > self.nbytes:
            self.nbytes = nbytes
            if self._storage is not None:
                torch.UntypedStorage.resize_(self._storage, nbytes)


class RemoteStorage(torch.UntypedStorage):
    """What ``untyped_storage()`` of a remote tensor returns: one object per daemon storage,
    shared by all its views. It is a (byte-less) meta storage underneath, so it passes as an
    ``UntypedStorage`` (``TypedStorage`` wraps it for ``t.storage()``) and nothing it is asked
    ever reads remote bytes: ``data_ptr()`` is a stand-in address, ``nbytes()`` the daemon
    storage's size, ``device`` the ``cuda`` device, and reading its contents raises."""

    _identity: _StorageIdentity

    def data_ptr(self) -> int:  # type: ignore[override]
        return self._identity.address

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return cuda_device(self._identity.device_index)

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True

    def _no_bytes(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            "libremote: the bytes of a remote storage cannot be read or written through the storage "
            "object; use the tensor (t.cpu(), t.copy_(...))"
        )

    cpu = tolist = __getitem__ = __setitem__ = copy_ = fill_ = _no_bytes  # type: ignore[assignment]


def _storage_bytes(spec: Spec) -> int:
    """How many bytes a fresh daemon tensor of ``spec`` has in its storage."""
    dtype, shape, stride, offset = spec
    if any(size == 0 for size in shape):
        return 0
    span = offset + sum((size - 1) * step for size, step in zip(shape, stride)) + 1
    return span * dtype.itemsize


def storage_of(tensor: RemoteTensor) -> _StorageIdentity:
    """``tensor``'s storage identity (a fresh one for a tensor that is no view)."""
    identity = tensor.__dict__.get("_storage")
    if identity is None:
        identity = tensor._storage = _StorageIdentity(_storage_bytes(tensor._spec), tensor._device_index)
    return identity


def share_storage(view: RemoteTensor, base: Any) -> None:
    """``view`` is a view of ``base`` (on the daemon it shares base's storage): so here too."""
    if isinstance(base, RemoteTensor):
        view._storage = storage_of(base)
        fit_storage(view)


def fit_storage(tensor: RemoteTensor) -> None:
    """After ``tensor``'s metadata changed (``resize_``, ``as_strided`` of a view): its storage
    is at least as large as the new metadata needs, as the daemon's has become."""
    storage_of(tensor).grow(_storage_bytes(tensor._spec))


def _wrapper(cls: type[RemoteTensor], spec: Spec, device_index: int) -> RemoteTensor:
    """The bare tensor object for ``spec``: metadata only, no storage. (``requires_grad`` is
    False by default; autograd sets it on the results it tracks. A zero storage offset is left
    out: parsing the keyword costs ~0.4 us, and every op makes a tensor.)"""
    dtype, shape, stride, offset = spec
    device = backend.device(device_index)
    if offset:
        return torch.Tensor._make_wrapper_subclass(cls, shape, strides=stride, storage_offset=offset, dtype=dtype,
                                                   device=device)
    return torch.Tensor._make_wrapper_subclass(cls, shape, strides=stride, dtype=dtype, device=device)


class RemoteTensor(torch.Tensor):
    """A tensor on a libremote daemon. Shown to the program as a ``cuda`` tensor."""

    _ref: _HandleRef
    _spec: Spec
    _device_index: int

    # Ops reach us through __torch_dispatch__ only; no per-call Python torch-function layer.
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, spec: Spec, ref: _HandleRef, device_index: int = 0,
                base: torch.Tensor | None = None) -> RemoteTensor:
        """``base``: the tensor this one is a view of (or whose metadata it replaces, for
        :func:`.dispatch._set_spec`), whose inference-ness it takes; see the module docstring."""
        if base is not None and base.is_inference() != torch.is_inference_mode_enabled():
            # A TensorImpl is an inference tensor iff InferenceMode is on while it is constructed:
            # switch the mode to the base's for the construction only (no op runs under it).
            with torch._C._InferenceMode(base.is_inference()):
                tensor = _wrapper(cls, spec, device_index)
        else:
            tensor = _wrapper(cls, spec, device_index)
        tensor._ref = ref
        tensor._spec = spec
        tensor._device_index = device_index
        return tensor

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        return _dispatch(func, args, kwargs or {})

    # ------------------------------------------------------------------------------------------
    # What the program sees: a cuda tensor
    # ------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return cuda_device(self._device_index)

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True

    def get_device(self) -> int:  # type: ignore[override]
        return self._device_index

    @property
    def data(self) -> RemoteTensor:  # type: ignore[override]
        with torch.no_grad():
            return self.detach()

    @data.setter
    def data(self, new: torch.Tensor) -> None:
        rebind(self, new)

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        return tensor_repr(self)

    def data_ptr(self) -> int:  # type: ignore[override]
        """A stand-in address, as on CUDA: the storage's (shared by its views, distinct per
        storage) plus ``storage_offset`` elements. A remote tensor has no local memory, so torch's
        answer would be 0 for all of them; programs compare data pointers to tell tensors apart
        (``make_graphed_callables`` copies a new input into its static one only if they differ)
        and to find tied weights (safetensors)."""
        return storage_of(self).address + self.storage_offset() * self.element_size()

    def untyped_storage(self) -> RemoteStorage:  # type: ignore[override]
        """The storage identity this tensor shares with its views (see :class:`RemoteStorage`).
        torch's own answer for a wrapper tensor is a storage without data that raises on
        ``data_ptr()``."""
        return storage_of(self).storage()

    def __format__(self, format_spec: str) -> str:
        # torch formats a 0-dim tensor as its number (f"{loss:.4f}") only for exact Tensor.
        if self.dim() == 0:
            return self.detach().item().__format__(format_spec)
        return object.__format__(self, format_spec)

    def type(self, dtype: Any = None, non_blocking: bool = False, **kwargs: Any) -> Any:  # type: ignore[override]
        """``t.type()`` names CUDA's legacy type (``torch.cuda.FloatTensor``); with a legacy
        type or its name, the tensor cast and moved as torch does (see :mod:`.legacy_types`)."""
        if dtype is None:
            return legacy_types.type_name(self)
        cast = legacy_types.cast(self, dtype, non_blocking or kwargs.get("async", False))
        return cast if cast is not None else torch.Tensor.type(self, dtype, non_blocking, **kwargs)

    def tolist(self) -> Any:  # type: ignore[override]
        return self.cpu().tolist()

    def numpy(self, *, force: bool = False) -> Any:  # type: ignore[override]
        if force:
            return self.detach().cpu().numpy()
        raise TypeError(
            f"can't convert {self.device} device type tensor to numpy. Use Tensor.cpu() to copy "
            "the tensor to host memory first."
        )

    def __array__(self, dtype: Any = None, copy: Any = None) -> Any:
        return self.numpy()

    def __deepcopy__(self, memo: dict[int, Any]) -> RemoteTensor:
        if id(self) in memo:
            return memo[id(self)]
        with torch.no_grad():
            new = self.clone(memory_format=torch.preserve_format)
        new.requires_grad_(self.requires_grad)
        for key, value in self.__dict__.items():
            if key not in OWN_ATTRIBUTES:
                setattr(new, key, copy.deepcopy(value, memo))
        memo[id(self)] = new
        return new

    def __coerce_same_metadata_as_tangent__(self, expected_meta: Any, expected_type: Any = None) -> RemoteTensor:
        """Graph mode (:mod:`.compile`) traces on plain meta tensors; at run time AOT autograd
        checks that each incoming gradient has the traced type and asks a subclass to coerce.
        A RemoteTensor already is what the shipped graph takes."""
        return self

    def __reduce_ex__(self, protocol: int) -> Any:
        return _reduce(self)


#: What a remote tensor takes from the layers above this one, which import it (so it cannot
#: import them): the op path (:func:`.dispatch.dispatch`), to which ``__torch_dispatch__`` hands
#: every op, and how it pickles (:func:`.serialization.reduce_remote_tensor`: as a CUDA tensor, in
#: torch.save's format). :func:`.registration.register` binds both, once, before any remote
#: tensor exists.
_dispatch: Any = None
_reduce: Any = None


def bind(dispatch: Any, reduce: Any) -> None:
    """Give remote tensors their op path and their pickling (see :data:`_dispatch`)."""
    global _dispatch, _reduce
    _dispatch, _reduce = dispatch, reduce


_new_remote_tensor = RemoteTensor.__new__


def make(spec: Spec, session: Any, device_index: int = 0, view_of: Any = None,
         keeps_inference: bool = True) -> RemoteTensor:
    """A new tensor with a fresh handle (the caller tells the daemon what to put there).
    ``view_of``: the argument the op's schema makes this result a view of; the result shares its
    storage identity and (unless ``keeps_inference`` is False: ``OpInfo.view_keeps_inference``)
    its inference-ness (see the module docstring)."""
    if isinstance(view_of, RemoteTensor):
        tensor = RemoteTensor(spec, _HandleRef(session.new_handle(), session), device_index,
                              view_of if keeps_inference else None)
        share_storage(tensor, view_of)
    else:  # (__new__ called directly: RemoteTensor(...) would call the no-op __init__ too)
        tensor = _new_remote_tensor(RemoteTensor, spec, _HandleRef(session.new_handle(), session), device_index)
    if session.made_while_recording is not None:  # torch.cuda.graph: see ClientSession.start_recording
        session.made_while_recording.append(weakref.ref(tensor))
    return tensor


def rebind(target: RemoteTensor, new: torch.Tensor) -> None:
    """``target.data = new``: target becomes an alias of ``new`` (metadata and daemon handle)."""
    if not isinstance(new, RemoteTensor):
        raise RuntimeError(
            f"data set to a tensor on {new.device} for a tensor on {target.device}: move it first "
            "(.data = t.to(param.device))"
        )
    with torch.no_grad():
        alias = aten.alias.default(new)
    if alias.is_inference() != target.is_inference():
        # torch lets ``.data =`` copy an inference tensor's dispatch keys into a normal tensor
        # (or the reverse) only between dense CPU/CUDA tensors (``_has_compatible_shallow_copy_type``);
        # it keeps the target's version counter, which decides whether in-place updates raise.
        # A PrivateUse1 tensor only takes identical keys: the target keeps its own inference-ness.
        template = RemoteTensor(alias._spec, alias._ref, alias._device_index, target)
        template._storage = storage_of(alias)
        alias = template
    torch._C.TensorBase.data.__set__(target, alias)
    target._ref = alias._ref
    target._spec = alias._spec
    target._storage = storage_of(alias)
    target._device_index = alias._device_index


def fetch(tensor: RemoteTensor) -> torch.Tensor:
    """The tensor's data as a new CPU tensor with the same shape (and, when dense, strides)."""
    session = tensor._ref.session
    if session.closed:
        raise RuntimeError("libremote: this tensor belongs to a closed session; its data is gone")
    result, frames = session.request([Cmd.FETCH, tensor._ref.id])
    dtype, shape, stride, frame_index = result
    numel = 1
    for size in shape:
        numel *= size
    if numel == 0:
        return torch.empty_strided(shape, stride, dtype=dtype)
    with warnings.catch_warnings():
        # The frame is read-only to Python but ours alone: the tensor may write to it.
        warnings.simplefilter("ignore", UserWarning)
        flat = torch_codec.tensor_from_bytes(frames[frame_index - 1].buffer, dtype, [numel])
    return flat.as_strided(shape, stride)


def tensor_repr(tensor: RemoteTensor) -> str:
    host = fetch(tensor)
    contents = torch._tensor_str._tensor_str(host, indent=len("tensor("))
    text = torch._tensor_str._str(tensor, tensor_contents=contents)
    # torch prefixes a subclass's repr with its class name, and wraps a subclass parameter's in
    # "Parameter(...)"; a CUDA tensor prints as "tensor(", a CUDA parameter as Parameter's repr.
    prefix = type(tensor).__name__ + "("
    parameter_prefix = "Parameter(" + prefix
    if text.startswith(parameter_prefix):
        return "Parameter containing:\ntensor(" + text[len(parameter_prefix):-1]
    return "tensor(" + text[len(prefix):] if text.startswith(prefix) else text
