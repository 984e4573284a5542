"""What the client learns once from each op's schema, and how arguments go on the wire.

Layer 2, remote tensors and their metadata: the op path reads an op's facts here.

An :class:`OpInfo` is computed the first time an op is dispatched and cached on the op: its wire
name, its defaults (arguments equal to a default are dropped so older daemons still understand
the call), and what each return is: a new tensor, a list of new tensors, one of the inputs
mutated in place (``Tensor(a!)``), or a plain value (which needs the daemon's answer).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import torch

from libremote_wire import codec, messages, torch_codec

from . import backend, generators
from .tensor import RemoteTensor


class Return(enum.Enum):
    NEW = "new"  # a new tensor (including views): gets a new handle
    NEW_LIST = "new_list"  # Tensor[]: a list of new tensors
    MUTATED_INPUT = "mutated_input"  # Tensor(a!): the input object itself
    SIZE = "size"  # int/SymInt: shape arithmetic, which local inference computes
    VALUE = "value"  # float/bool/Scalar/...: depends on data, the daemon must compute it


_NO_DEFAULT = object()


@dataclass(frozen=True)
class OpInfo:
    name: str
    positional_defaults: tuple[Any, ...]  # per positional argument: default or _NO_DEFAULT
    #: Positional arguments before this index have no default (are always sent).
    required_positional: int
    kwarg_defaults: dict[str, Any]
    returns: tuple[Return, ...]
    #: For MUTATED_INPUT returns: ("arg", index) or ("kwarg", name) of the mutated argument.
    return_sources: tuple[Any, ...]
    #: Scalar values cannot change the result's metadata (pointwise and foreach ops): the
    #: metadata cache keys on their types only.
    pointwise: bool
    #: The op's result metadata depends on tensor *values*: it must run on the daemon first.
    needs_daemon_answer: bool
    #: CompositeImplicitAutograd: torch decomposes it above us, except for tensors without
    #: autograd keys (made under inference_mode), where we decompose it ourselves.
    composite: bool
    #: The common case, one new tensor returned: the op path takes a shortcut.
    returns_one_new_tensor: bool
    #: Per return: for a view of an argument (``Tensor(a)`` in the schema, ``Tensor(a)[]`` for
    #: lists), ("arg", index) or ("kwarg", name) of that argument, whose storage it shares.
    view_sources: tuple[Any, ...] = ()
    #: The positional index of the argument a single returned view shares its storage with.
    view_of: int | None = None
    #: A returned view is an inference tensor exactly when its base is (ATen builds views from
    #: the base's dispatch keys); False for view kernels that build their result as a new
    #: tensor, whose inference-ness is the current mode's (see :data:`_VIEWS_MADE_AFRESH`).
    view_keeps_inference: bool = True


_infos: dict[torch._ops.OpOverload, OpInfo] = {}


def _return_kind(ret: torch._C.Argument) -> Return:
    if ret.alias_info is not None and ret.alias_info.is_write:
        return Return.MUTATED_INPUT
    kind = ret.type
    if isinstance(kind, torch._C.OptionalType):
        kind = kind.getElementType()
    if isinstance(kind, torch._C.TensorType):
        return Return.NEW
    if isinstance(kind, torch._C.ListType) and isinstance(kind.getElementType(), torch._C.TensorType):
        return Return.NEW_LIST
    if isinstance(kind, (torch._C.IntType, torch._C.SymIntType)):
        return Return.SIZE
    return Return.VALUE


#: Ops whose result shares its input's storage on every device although the schema does not say
#: so (``_unsafe_view``: a view that autograd must not track as one).
_UNDECLARED_VIEWS = {"aten::_unsafe_view": ("arg", 0)}


#: View ops whose ATen kernel makes its result with ``make_tensor<TensorImpl>(storage, key_set, ...)``
#: rather than as a ``TensorImpl::VIEW`` (``view_dtype``, aten/src/ATen/native/TensorConversions.cpp):
#: under ``torch.inference_mode()`` their result is an inference tensor whatever the base, and
#: outside it a normal tensor (checked against every strided view op of torch 2.13 in
#: tests/test_inference_mode.py).
_VIEWS_MADE_AFRESH = frozenset({"aten::view.dtype"})


def _view_sources(schema: torch._C.FunctionSchema, returns: tuple[Return, ...]) -> tuple[Any, ...]:
    """Per return, the argument whose storage it shares (see :attr:`OpInfo.view_sources`)."""
    read_sets: dict[str, Any] = {}
    wildcard_source = None
    for index, arg in enumerate(schema.arguments):
        info = arg.alias_info
        if info is None or info.is_write:
            continue
        where = ("kwarg", arg.name) if arg.kwarg_only else ("arg", index)
        for alias_set in info.before_set:
            read_sets.setdefault(alias_set, where)
        if "*" in info.after_set:
            wildcard_source = where  # Tensor(a -> *): the elements of a Tensor(a)[] result
    sources = []
    for ret, kind in zip(schema.returns, returns):
        info = ret.alias_info
        source = None
        if kind is Return.NEW and info is not None and not info.is_write:
            source = next((read_sets[s] for s in info.before_set if s in read_sets), None)
        elif kind is Return.NEW_LIST and info is not None and not info.is_write:
            source = wildcard_source
        sources.append(source)
    if not any(sources) and schema.name in _UNDECLARED_VIEWS and len(sources) == 1:
        sources = [_UNDECLARED_VIEWS[schema.name]]
    return tuple(sources)


def _single_view_of(view_sources: tuple[Any, ...]) -> int | None:
    """See :attr:`OpInfo.view_of`."""
    if len(view_sources) == 1 and view_sources[0] is not None and view_sources[0][0] == "arg":
        return view_sources[0][1]
    return None


def op_info(func: torch._ops.OpOverload) -> OpInfo:
    info = _infos.get(func)
    if info is not None:
        return info
    schema = func._schema
    name = schema.name if not schema.overload_name else f"{schema.name}.{schema.overload_name}"
    positional = []
    kwarg_defaults = {}
    alias_sources: dict[Any, Any] = {}
    for index, arg in enumerate(schema.arguments):
        default = arg.default_value if arg.has_default_value() else _NO_DEFAULT
        if arg.kwarg_only:
            kwarg_defaults[arg.name] = default
            where: Any = ("kwarg", arg.name)
        else:
            positional.append(default)
            where = ("arg", index)
        if arg.alias_info is not None and arg.alias_info.is_write:
            for alias_set in arg.alias_info.before_set:
                alias_sources[alias_set] = where
    returns = tuple(_return_kind(ret) for ret in schema.returns)
    sources = []
    for ret, kind in zip(schema.returns, returns):
        source = None
        if kind is Return.MUTATED_INPUT:
            source = next((alias_sources[s] for s in ret.alias_info.before_set if s in alias_sources), None)
        sources.append(source)
    view_sources = _view_sources(schema, returns)
    tags = func.tags
    required = 0
    while required < len(positional) and positional[required] is _NO_DEFAULT:
        required += 1
    info = OpInfo(
        name=name,
        positional_defaults=tuple(positional),
        required_positional=required,
        kwarg_defaults=kwarg_defaults,
        returns=returns,
        return_sources=tuple(sources),
        # foreach ops are elementwise per tensor although torch does not tag them pointwise.
        pointwise=torch.Tag.pointwise in tags or func._schema.name.startswith("aten::_foreach_"),
        needs_daemon_answer=(
            Return.VALUE in returns
            or torch.Tag.dynamic_output_shape in tags
            or torch.Tag.data_dependent_output in tags
        ),
        # Unless the remote device has a kernel of its own (registration._OPS_FUSED_ON_CUDA): those
        # travel as one op, as CUDA runs them.
        composite=(torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd")
                   and not torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "PrivateUse1")),
        returns_one_new_tensor=returns == (Return.NEW,),
        view_sources=view_sources,
        view_of=_single_view_of(view_sources),
        view_keeps_inference=name not in _VIEWS_MADE_AFRESH,
    )
    _infos[func] = info
    return info


def _same(value: Any, default: Any) -> bool:
    if value is default:
        return True
    if default is _NO_DEFAULT or type(value) is not type(default):
        return isinstance(value, (list, tuple)) and isinstance(default, (list, tuple)) and list(value) == list(default)
    try:
        return bool(value == default)
    except Exception:
        return False


class WireEncoder:
    """Encodes one op's arguments for the daemon, checking they belong to ``session``."""

    __slots__ = ("session", "op_name", "keepalive")

    def __init__(self, session: Any, op_name: str) -> None:
        self.session = session
        self.op_name = op_name
        #: Temporaries uploaded for this op; they must outlive its submission.
        self.keepalive: list[Any] = []

    def arguments(self, info: OpInfo, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        count = len(args)
        required = info.required_positional
        if count > required:
            defaults = info.positional_defaults
            while count > required and count <= len(defaults) and _same(args[count - 1], defaults[count - 1]):
                count -= 1
        session, value = self.session, self.value
        wire_args = [
            arg._ref.wire if type(arg) is RemoteTensor and arg._ref.session is session else value(arg)
            for arg in (args if count == len(args) else args[:count])
        ]
        if not kwargs:
            return wire_args, {}
        kwarg_defaults = info.kwarg_defaults
        wire_kwargs = {
            key: value(item)
            for key, item in kwargs.items()
            if not _same(item, kwarg_defaults.get(key, _NO_DEFAULT))
        }
        return wire_args, wire_kwargs

    def value(self, value: Any) -> Any:
        kind = type(value)
        if kind is RemoteTensor:
            return self.tensor(value)
        if value is None or kind is int or kind is float or kind is bool or kind is str:
            return value
        if kind is list or kind is tuple or kind is torch.Size:
            return [self.value(item) for item in value]
        if isinstance(value, RemoteTensor):
            return self.tensor(value)
        if isinstance(value, torch.Tensor):
            return self.host_tensor(value)
        if kind is torch.dtype:
            return torch_codec.dtype_ext(value)
        if kind is torch.device:
            if value.type != backend.BACKEND_NAME:
                raise RuntimeError(
                    f"libremote: {self.op_name} was asked for device {value}; it can create tensors "
                    "on the remote device only (make it on the remote device, then call .cpu())"
                )
            return codec.device_ext(self.session.local_device(value.index or 0))
        if kind is torch.memory_format:
            return torch_codec.memory_format_ext(value)
        if kind is torch.layout:
            return torch_codec.layout_ext(value)
        if kind is complex:
            return codec.complex_ext(value)
        if isinstance(value, bool):
            return bool(value)
        if isinstance(value, int):  # IntEnum and other int subclasses
            return int(value)
        if isinstance(value, float):
            return float(value)
        if hasattr(value, "dtype") and hasattr(value, "item"):  # numpy scalars
            return self.value(value.item())
        if isinstance(value, torch._C.Generator):  # torch.Generator("cuda"): see generators.py
            return generators.wire(value, self.session)
        raise TypeError(f"libremote: cannot send a {kind.__name__} argument of {self.op_name} to the daemon")

    def tensor(self, tensor: RemoteTensor) -> Any:
        ref = tensor._ref
        if ref.session is not self.session:
            if not ref.session.closed and not self.session.closed:
                # Both open: devices of two daemons (libremote/client/servers.py), as CUDA says it.
                raise RuntimeError(
                    "Expected all tensors to be on the same device, but found at least two devices, "
                    f"cuda:{tensor._device_index} and cuda:{self.session.global_devices[0]}! (in {self.op_name}; "
                    "those devices are on different libremote daemons: move one tensor with .to(device))"
                )
            raise RuntimeError(
                "libremote: this tensor belongs to an earlier session (the connection was closed "
                "or re-opened, and the daemon freed its memory); recreate it"
            )
        return ref.wire

    def host_tensor(self, tensor: torch.Tensor) -> Any:
        if tensor.device.type != "cpu":
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but found at least two devices, "
                f"cuda:0 and {tensor.device}! (in {self.op_name})"
            )
        if tensor.nbytes <= messages.INLINE_TENSOR_BYTES:
            return torch_codec.inline_tensor_ext(tensor.resolve_conj().resolve_neg())
        # A large host tensor mixed into a device op (CUDA allows this for index tensors):
        # upload it first; it is released after the op in command order.
        remote = tensor.to(backend.device(self.session.global_devices[0]))  # (a device of this op's daemon)
        self.keepalive.append(remote)
        return self.tensor(remote)
