"""The op path: every aten op on a RemoteTensor (or a factory call on the remote device).

Layer 3, the op path: over the remote tensors and their metadata; :mod:`.registration` gives it
to torch (the PrivateUse1 fallback) and to ``RemoteTensor.__torch_dispatch__``.

``dispatch`` is called from ``RemoteTensor.__torch_dispatch__`` and from the PrivateUse1 fallback.
Autograd, autocast and composite ops have already run above it, on the client: the daemon only
ever sees aten ops.

Streaming path (almost every op): infer output metadata locally (cached), allocate handles, queue
an OP command, return wrappers at once. Sync path (ops whose results depend on data: ``.item()``,
``nonzero``, boolean masks, ``equal``, ops without a meta kernel): send OP_SYNC and build results
from the daemon's answer. Data movement between host and device (``.cpu()``, ``copy_`` across
devices) is handled by :mod:`.sync`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from libremote_wire.messages import Cmd

from . import backend, meta, runtime, sparse
from .ops import OpInfo, Return, WireEncoder, op_info
from .tensor import RemoteStorage, RemoteTensor, _HandleRef, fit_storage, make, share_storage, storage_of

aten = torch.ops.aten


def dispatch(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    info = _one_tensor_ops.get(func)
    if info is not None and not kwargs:
        tensor = _stream_one_tensor(func, info, args)
        if tensor is not None:
            return tensor
    special = _SPECIAL.get(func)
    if special is not None:
        return special(func, args, kwargs)
    return run(func, args, kwargs)


_COMPOSITE = torch._C.DispatchKey.CompositeImplicitAutograd
_AD_INPLACE_OR_VIEW = torch._C.DispatchKey.ADInplaceOrView

#: Ops that return one new tensor and need nothing but local inference (``y = x * a``, views,
#: matmuls): the bulk of a training step. Filled as ops are first run through :func:`run`.
_one_tensor_ops: dict[torch._ops.OpOverload, OpInfo] = {}


def _stream_one_tensor(func: torch._ops.OpOverload, info: OpInfo, args: tuple[Any, ...]) -> RemoteTensor | None:
    """The common case in one function: positional arguments only, tensors of one open session
    on one device, and output metadata already in the cache. Does what :func:`run` would (same
    cache key, same wire command) without its layers; ``None`` sends the call down the general
    path, which also fills the cache. (The session is the tensors' own: with several daemons,
    see :mod:`.servers`, each op goes to the daemon of its device.)"""
    session = None
    values_matter = not info.pointwise
    key: list[Any] = []
    #: The arguments as they travel, while every one is a tensor (as WireEncoder would encode them).
    wire_args: list[Any] | None = []
    index = -1
    for arg in args:
        if type(arg) is RemoteTensor:
            ref = arg._ref
            if ref.session is not session:
                if session is not None:
                    return None
                session = ref.session
            if index != arg._device_index:
                if index >= 0:
                    return None
                index = arg._device_index
            key.append(arg._spec)
            if wire_args is not None:
                wire_args.append(ref.wire)
        elif isinstance(arg, torch.Tensor):  # a host tensor, or a subclass: the general path
            return None
        elif type(arg) is list and any(isinstance(item, torch.Tensor) for item in arg):
            return None  # tensor lists (cat, index): the general path checks their devices
        else:
            key.append(meta.signature(arg, values_matter))
            wire_args = None
    if index < 0 or session.closed:
        return None
    specs = meta.cached(func, tuple(key))
    if specs is None or specs[0] is None:
        return None
    if wire_args is None:  # (a scalar or other value among them: defaults are left out, values encoded)
        wire_args, _ = WireEncoder(session, info.name).arguments(info, args, {})
    tensor = make(specs[0], session, index, None if info.view_of is None else args[info.view_of],
                  info.view_keeps_inference)
    session.submit([Cmd.OP, session.op_ref(info.name), wire_args, {}, [tensor._ref.id]])
    return tensor


def run(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any],
        device_index: int | None = None) -> Any:
    """Forward ``func`` to the daemon: streamed when its metadata can be inferred, else synchronous.
    ``device_index``: where results live, for the ops that may span devices (copy_)."""
    info = op_info(func)
    if info.returns_one_new_tensor and not info.composite and not info.needs_daemon_answer and func not in _SPECIAL:
        _one_tensor_ops[func] = info
    if info.composite:
        # The C++ CompositeImplicitAutograd kernel, which the CPU and CUDA run; not
        # ``func.decompose``, which prefers the Python decompositions torch registers over some
        # (``matmul``, ``upsample_nearest2d.vec``, ``lstm``): those round otherwise, and some
        # make tensors on ``input.device`` (cuda, which a CPU build cannot hold). Its ops
        # dispatch as they would outside this handler, where torch excludes ADInplaceOrView: a
        # view of a parameter must be a view that requires grad, as on the CPU, because
        # composites decide by that (``matmul`` folds a batched input into one ``mm`` when the
        # weight requires grad, else runs ``bmm``: another rounding, in inference mode).
        # (Not for composites that return views, ``reshape``, ``chunk``: their inner view ops'
        # results already take their base's inference-ness and version counter (tensor.make),
        # and ADInplaceOrView would make them views a second time.)
        if any(source is not None for source in info.view_sources):
            return func._op_dk(_COMPOSITE, *args, **kwargs)
        with torch._C._SetExcludeDispatchKeyGuard(_AD_INPLACE_OR_VIEW, False):
            return func._op_dk(_COMPOSITE, *args, **kwargs)
    device = kwargs.get("device")
    if isinstance(device, torch.device) and device.type not in (backend.BACKEND_NAME, "meta"):
        # zeros_like(remote, device="cpu"), x.new_empty(..., device="cpu"): only the remote
        # tensor's metadata matters, and the result belongs to the host.
        return func(*meta.stand_in(args), **{key: meta.stand_in(value) for key, value in kwargs.items()})
    if (isinstance(device, torch.device) and device.index is not None and args and type(args[0]) is RemoteTensor
            and args[0]._ref.session is not runtime.session_for(device.index) and _takes_metadata_only(info)):
        # zeros_like(x, device="cuda:1"), x.new_ones(2, device="cuda:1") with x on another daemon
        # (libremote/client/servers.py): x lends only its metadata, so a stand-in with its layout
        # on the target device takes its place (the daemon zeroes what it allocates).
        source = args[0]
        stand_in = run(aten.empty_strided.default, (list(source.shape), list(source.stride())),
                       {"dtype": source.dtype, "device": device})
        args = (stand_in, *args[1:])
    if not info.needs_daemon_answer:
        try:
            specs = meta.infer(func, info, args, kwargs)
        except meta.NeedsDaemon:
            pass
        else:
            return _stream(func, info, specs, args, kwargs, device_index)
    return _run_synchronously(func, info, args, kwargs, device_index)


def _takes_metadata_only(info: OpInfo) -> bool:
    """Ops that read only their first tensor's shape, strides and dtype (``*_like``, ``new_*``)."""
    name = info.name.split("::", 1)[-1].split(".", 1)[0]
    return name.endswith("_like") or name.startswith("new_")


def _device_index(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """The device the op's results live on: its ``device`` argument, else its tensors' device,
    which must then be one device (as on CUDA)."""
    device = kwargs.get("device")
    if isinstance(device, torch.device) and device.index is not None:
        return device.index
    found = None
    for value in (*args, *kwargs.values()) if kwargs else args:  # (kwargs: out= tensors)
        if type(value) is RemoteTensor or isinstance(value, RemoteTensor):
            index = value._device_index
        elif isinstance(value, (list, tuple)):
            index = next((item._device_index for item in value if isinstance(item, RemoteTensor)), None)
            if index is None:
                continue
        else:
            continue
        if found is None:
            found = index
        elif index != found:
            raise RuntimeError(
                "Expected all tensors to be on the same device, but found at least two devices, "
                f"cuda:{found} and cuda:{index}!"
            )
    return found or 0


def _mutated_input(source: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    where, key = source
    return args[key] if where == "arg" else kwargs[key]


def _view_base(view_source: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The argument that the schema makes a result a view of (``None`` for a new tensor): the
    result shares its storage and its inference-ness (:func:`.tensor.make`)."""
    if view_source is None:
        return None
    where, key = view_source
    if where == "kwarg":
        return kwargs.get(key)
    return args[key] if key < len(args) else None


def _stream(func: torch._ops.OpOverload, info: OpInfo, specs: tuple[Any, ...], args: tuple[Any, ...],
            kwargs: dict[str, Any], device_index: int | None = None) -> Any:
    index = _device_index(args, kwargs) if device_index is None else device_index
    session = runtime.session_for(index)
    encoder = WireEncoder(session, info.name)
    wire_args, wire_kwargs = encoder.arguments(info, args, kwargs)
    if info.returns_one_new_tensor and type(specs[0]) is tuple:  # (not None, not a HostResult)
        tensor = make(specs[0], session, index, _view_base(info.view_sources[0], args, kwargs),
                      info.view_keeps_inference)
        session.submit([Cmd.OP, session.op_ref(info.name), wire_args, wire_kwargs, [tensor._ref.id]])
        return tensor
    outs: list[Any] = []
    results: list[Any] = []
    for kind, source, view_source, spec in zip(info.returns, info.return_sources, info.view_sources, specs):
        if kind is Return.NEW:
            if spec is None:
                outs.append(None)
                results.append(None)
            elif type(spec) is meta.HostResult:
                outs.append(None)
                results.append(spec.tensor)
            else:
                tensor = make(spec, session, index, _view_base(view_source, args, kwargs), info.view_keeps_inference)
                outs.append(tensor._ref.id)
                results.append(tensor)
        elif kind is Return.NEW_LIST:
            base = _view_base(view_source, args, kwargs)
            tensors = [make(item, session, index, base, info.view_keeps_inference) for item in spec]
            outs.append([tensor._ref.id for tensor in tensors])
            results.append(tensors)
        elif kind is Return.SIZE:
            outs.append(None)
            results.append(spec)
        else:  # MUTATED_INPUT
            outs.append(None)
            mutated = _mutated_input(source, args, kwargs) if source else None
            if isinstance(mutated, RemoteTensor) and spec is not None and mutated._spec != spec:
                _set_spec(mutated, spec)
            results.append(mutated)
    session.submit([Cmd.OP, session.op_ref(info.name), wire_args, wire_kwargs, outs])
    return _pack_results(info, results)


def _pack_results(info: OpInfo, results: list[Any]) -> Any:
    if len(info.returns) == 1:
        return results[0]
    if not info.returns:
        return None
    return tuple(results)


def _run_synchronously(func: torch._ops.OpOverload, info: OpInfo, args: tuple[Any, ...], kwargs: dict[str, Any],
                       device_index: int | None = None) -> Any:
    """Run on the daemon and wait: the results' metadata (or values) come from its answer."""
    index = _device_index(args, kwargs) if device_index is None else device_index
    session = runtime.session_for(index)
    encoder = WireEncoder(session, info.name)
    wire_args, wire_kwargs = encoder.arguments(info, args, kwargs)
    outs: list[Any] = []
    for kind in info.returns:
        if kind is Return.NEW:
            outs.append(session.new_handle())
        elif kind is Return.NEW_LIST:
            count = next((len(a) for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)), None)
            if count is None:
                raise NotImplementedError(f"libremote: {info.name} returns a list of unknown length")
            outs.append([session.new_handle() for _ in range(count)])
        else:
            outs.append(None)
    try:
        (values, metas), _ = session.request([Cmd.OP_SYNC, session.op_ref(info.name), wire_args, wire_kwargs, outs])
    except BaseException:
        for handle in _flat(outs):
            session.release(handle)
        raise
    results: list[Any] = []
    for kind, source, view_source, out, value, tensor_meta in zip(
            info.returns, info.return_sources, info.view_sources, outs, values, metas):
        if kind is Return.NEW:
            if tensor_meta is None:  # an undefined optional result: the handle stays unused
                session.release(out)
                results.append(None)
            else:
                results.append(_adopt(tensor_meta, out, session, index, _view_base(view_source, args, kwargs),
                                      info.view_keeps_inference))
        elif kind is Return.NEW_LIST:
            base = _view_base(view_source, args, kwargs)
            results.append([_adopt(m, h, session, index, base, info.view_keeps_inference)
                            for m, h in zip(tensor_meta, out)])
        elif kind is Return.MUTATED_INPUT:
            mutated = _mutated_input(source, args, kwargs) if source else None
            if isinstance(mutated, RemoteTensor) and tensor_meta is not None:
                spec = _spec_from_wire(tensor_meta)
                if mutated._spec != spec:
                    _set_spec(mutated, spec)
            results.append(mutated)
        else:
            results.append(value)
    return _pack_results(info, results)


def _flat(outs: list[Any]) -> list[int]:
    flat: list[int] = []
    for out in outs:
        if isinstance(out, list):
            flat.extend(out)
        elif out is not None:
            flat.append(out)
    return flat


def _spec_from_wire(tensor_meta: list[Any]) -> tuple[Any, ...]:
    if len(tensor_meta) != 4:  # a sparse tensor's (libremote_wire.torch_codec.tensor_meta)
        return sparse.spec_from_wire(tensor_meta)
    dtype, shape, stride, offset = tensor_meta
    return (dtype, tuple(shape), tuple(stride), offset)


def _adopt(tensor_meta: list[Any], handle: int, session: Any, index: int, view_of: Any = None,
           keeps_inference: bool = True) -> RemoteTensor:
    """A result of a synchronous op, whose handle was allocated before the call; ``view_of`` and
    ``keeps_inference`` as for :func:`.tensor.make`."""
    if len(tensor_meta) != 4:
        return sparse.adopt(sparse.spec_from_wire(tensor_meta), handle, session, index)
    if not isinstance(view_of, RemoteTensor):
        return RemoteTensor(_spec_from_wire(tensor_meta), _HandleRef(handle, session), index)
    tensor = RemoteTensor(_spec_from_wire(tensor_meta), _HandleRef(handle, session), index,
                          view_of if keeps_inference else None)
    share_storage(tensor, view_of)
    return tensor


def _set_spec(tensor: RemoteTensor, spec: tuple[Any, ...]) -> None:
    """Give ``tensor`` new metadata in place (after resize_, t_, unsqueeze_, ...). ``.data =``
    copies the template's dispatch keys too, so the template is made with ``tensor``'s own
    inference-ness: an in-place op inside inference mode leaves a normal tensor normal."""
    if type(spec) is not tuple:
        sparse.set_spec(tensor, spec)
        return
    template = RemoteTensor(spec, tensor._ref, tensor._device_index, tensor)
    torch._C.TensorBase.data.__set__(tensor, template)
    tensor._spec = spec
    fit_storage(tensor)


def set_storage(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``self.set_(source, ...)``: on the daemon ``self`` now uses ``source``'s storage, so here
    too it shares ``source``'s storage identity (as on CUDA, where their ``untyped_storage()``
    are then one). ``self.set_()`` gives it a new empty storage. The identity is switched before
    the op runs: the op's new metadata must size the new storage, never the old one that other
    views may still share."""
    target = args[0]
    source = args[1] if len(args) > 1 else kwargs.get("source")
    before = target.__dict__.get("_storage")
    if isinstance(source, RemoteTensor):
        target._storage = storage_of(source)
    elif isinstance(source, RemoteStorage):
        target._storage = source._identity
    elif source is None:
        target._storage = None  # storage_of makes a fresh one for the new metadata
    try:
        return run(func, args, kwargs)
    except BaseException:
        target._storage = before
        raise


_SPECIAL: dict[torch._ops.OpOverload, Callable[..., Any]] = {
    aten.is_pinned.default: lambda func, args, kwargs: False,
    **{getattr(aten.set_, overload): set_storage for overload in aten.set_.overloads()},
}


def handle_specially(handlers: dict[torch._ops.OpOverload, Callable[..., Any]]) -> None:
    """Ops that a layer above runs itself, calling :func:`run` for their device side: the copies
    between the host and the daemon (:data:`.sync.SPECIAL_OPS`, given by :func:`.registration.register`)."""
    _SPECIAL.update(handlers)
