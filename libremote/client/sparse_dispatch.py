"""The op path of sparse arguments: every aten op on a sparse remote tensor.

Layer 3, the op path, over :mod:`.dispatch`, whose :func:`~.dispatch.run` and friends it calls;
``RemoteSparseTensor.__torch_dispatch__`` is given :func:`dispatch` by :mod:`.registration`. What
a sparse remote tensor is, and why its ops wait for the daemon's metadata: :mod:`.sparse`.
"""

from __future__ import annotations

from typing import Any

import torch

from libremote_wire.messages import Cmd

from . import backend, meta, runtime, transfer
from . import dispatch as dense
from .ops import Return, WireEncoder, op_info
from .sparse import RemoteSparseTensor, to_host, upload
from .tensor import RemoteTensor, _HandleRef

aten = torch.ops.aten


def _layout(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return args[0]._spec.layout


#: Ops answered from the spec, without the daemon.
_LOCAL: dict[Any, Any] = {
    aten._nnz.default: lambda func, args, kwargs: args[0]._spec.nnz,
    aten.sparse_dim.default: lambda func, args, kwargs: args[0]._spec.sparse_dim,
    aten._dimI.default: lambda func, args, kwargs: args[0]._spec.sparse_dim,
    aten.dense_dim.default: lambda func, args, kwargs: args[0]._spec.dense_dim,
    aten._dimV.default: lambda func, args, kwargs: args[0]._spec.dense_dim,
    aten.is_coalesced.default: lambda func, args, kwargs: bool(args[0]._spec.coalesced),
    aten.is_pinned.default: lambda func, args, kwargs: False,
    torch.ops.prim.layout.default: _layout,
}

#: Ops whose sparse result has its argument's metadata: they stream (no answer awaited).
_SAME_SPEC = frozenset({aten.detach.default, aten.clone.default})

#: Dense result metadata of ops on sparse arguments, from the daemon's first answer: (op,
#: argument signature) -> specs.
_dense_results: dict[Any, tuple[Any, ...]] = {}
_MAX_CACHE = 1 << 12


def dispatch(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """An aten op with a sparse remote argument (``RemoteSparseTensor.__torch_dispatch__``)."""
    local = _LOCAL.get(func)
    if local is not None:
        return local(func, args, kwargs)
    if func is aten._to_copy.default:
        return _to_copy(func, args, kwargs)
    if func is aten.copy_.default:
        return _copy(func, args, kwargs)
    info = op_info(func)
    if info.composite:
        return dense.run(func, args, kwargs)
    if func in _SAME_SPEC and not kwargs:
        return _same_spec(func, info, args)
    key = None
    if not info.needs_daemon_answer and all(kind is Return.NEW for kind in info.returns) \
            and not any(info.view_sources):
        try:
            key = (func, meta.signature(args, True), meta.signature(kwargs, True) if kwargs else None)
            hash(key)
        except TypeError:
            key = None
        specs = _dense_results.get(key) if key is not None else None
        if specs is not None:
            return dense._stream(func, info, specs, args, kwargs)
    result = dense._run_synchronously(func, info, args, kwargs)
    if key is not None:
        results = (result,) if len(info.returns) == 1 else tuple(result)
        if all(type(value) is RemoteTensor for value in results):  # all dense: reusable
            if len(_dense_results) >= _MAX_CACHE:
                _dense_results.clear()
            _dense_results[key] = tuple(value._spec for value in results)
    return result


def _same_spec(func: Any, info: Any, args: tuple[Any, ...]) -> RemoteSparseTensor:
    source = args[0]
    session = runtime.session_for(source._device_index)
    wire_args, _ = WireEncoder(session, info.name).arguments(info, args, {})
    view = info.view_of is not None
    tensor = RemoteSparseTensor(source._spec, _HandleRef(session.new_handle(), session), source._device_index,
                                source if view else None)
    session.submit([Cmd.OP, session.op_ref(info.name), wire_args, {}, [tensor._ref.id]])
    return tensor


def _to_copy(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    device = kwargs.get("device")
    if device is None or device.type == backend.BACKEND_NAME:
        if device is not None and transfer.crosses_daemons(args[0], device.index or 0):
            raise RuntimeError(f"libremote: a sparse tensor cannot move between daemons yet ({args[0].device} to "
                               f"cuda:{device.index or 0}); move it through the host (.cpu()), or move its "
                               "indices and values")
        return dense._run_synchronously(func, op_info(func), args, kwargs)
    if device.type != "cpu":
        raise RuntimeError(f"libremote: cannot copy a remote tensor to {device}")
    host = to_host(args[0])
    rest = {key: value for key, value in kwargs.items() if key not in ("device", "non_blocking", "pin_memory")}
    if rest.get("dtype") not in (None, host.dtype) or rest.get("layout") not in (None, host.layout):
        host = aten._to_copy.default(host, **rest)
    return host


def _copy(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    destination, source = args[0], args[1]
    if not isinstance(destination, RemoteTensor):  # host.copy_(remote sparse)
        return destination.copy_(to_host(source))
    if not isinstance(source, RemoteTensor):  # remote.copy_(host): upload first
        source = upload(source, destination._device_index)
    return dense._run_synchronously(func, op_info(func), (destination, source, *args[2:]), kwargs)
