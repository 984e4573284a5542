"""Local shape inference: what an op will produce, worked out without asking the daemon.

Layer 2, remote tensors and their metadata: the op path asks it before it sends.

The op runs on ``meta`` tensors (shape, stride, dtype, no data), which also raises torch's own
errors for bad shapes and dtypes on the user's line. Results are cached by the op and the
*signature* of its arguments (tensor metadata, and scalar values where they can matter), because
torch's meta kernels cost tens of microseconds and a training loop repeats the same calls.

The meta device runs torch's C++ meta kernels where torch has them (the first half of the CPU
and CUDA kernels), not the Python ones torch registers over them, whose strides differ: see
:func:`_prefer_native_meta_kernels`.

Where meta inference cannot answer (ops whose output shape depends on data, ops without a meta
kernel), :class:`NeedsDaemon` tells the caller to run the op synchronously and take the daemon's
metadata instead.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch._prims_common import suggest_memory_format

from . import backend, warning_location
from .ops import OpInfo, Return
from .tensor import RemoteTensor

_META = torch.device("meta")
_CPU = torch.device("cpu")
_MAX_CACHE = 1 << 16

_cache: dict[Any, tuple[Any, ...]] = {}
#: Ops whose meta inference failed for want of a kernel: go straight to the daemon next time.
ops_without_meta: set[torch._ops.OpOverload] = set()


class NeedsDaemon(Exception):
    """Metadata for this call can only come from running it."""


def signature(value: Any, values_matter: bool) -> Any:
    """A hashable key of everything in ``value`` that can change an op's output metadata."""
    kind = type(value)
    if kind is RemoteTensor:
        return value._spec
    if kind is int or kind is str or value is None:
        return value if values_matter else kind
    if kind is float or kind is bool or kind is complex:
        return (kind, value) if values_matter else kind
    if kind is list or kind is tuple or kind is torch.Size:
        return tuple(signature(item, values_matter) for item in value)
    if isinstance(value, RemoteTensor):
        return value._spec
    if isinstance(value, torch.Tensor):
        return ("host", value.dtype, tuple(value.shape), value.stride(), value.device.type)
    if kind is dict:
        return tuple((key, signature(item, values_matter)) for key, item in value.items())
    if isinstance(value, torch._C.Generator):
        return "generator"  # shapes never depend on it (and the cache must not keep it alive)
    try:
        hash(value)
    except TypeError:
        return (kind, id(value))
    return (kind, value)


def _stand_in(value: Any, device: torch.device) -> Any:
    """``value`` with each remote tensor replaced by a data-less tensor of the same metadata on
    ``device`` (meta; or the CPU for empty tensors, see :func:`infer`). Host tensors follow
    CUDA's rules: a 0-dim one acts as a scalar next to device tensors, a larger one stays on the
    host so that torch's own device checks (which accept host index tensors) apply."""
    kind = type(value)
    if kind is RemoteTensor or isinstance(value, RemoteTensor):
        dtype, shape, stride, offset = value._spec
        if offset:
            span = offset + sum((size - 1) * step for size, step in zip(shape, stride) if size) + 1
            return torch.empty((span,), dtype=dtype, device=device).as_strided(shape, stride, offset)
        return torch.empty_strided(shape, stride, dtype=dtype, device=device)
    if kind is list or kind is tuple:
        return kind(_stand_in(item, device) for item in value)
    if kind is torch.device and value.type == backend.BACKEND_NAME:
        return device
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.device.type == "cpu":
        return torch.empty((), dtype=value.dtype, device=device)
    return value


def stand_in(value: Any) -> Any:
    """``value`` with remote tensors replaced by meta tensors of the same metadata."""
    return _stand_in(value, _META)


def _all_remote_tensors_empty(value: Any) -> bool:
    """True if ``value`` holds remote tensors and every one of them has no elements."""
    found = False
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, RemoteTensor):
            if item.numel():
                return False
            found = True
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return found


def spec_of(tensor: torch.Tensor) -> tuple[Any, ...]:
    return (tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset())


class HostResult:
    """An output that CUDA itself leaves on the host, computed by the meta kernel with its values:
    ``_pack_padded_sequence``'s ``batch_sizes`` and ``_pad_packed_sequence``'s ``lengths``, which
    torch builds on the CPU from host lengths whatever the input's device. The op is still sent;
    the daemon does not keep this output."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def _describe_result(info: OpInfo, result: Any, meta_args: tuple[Any, ...], meta_kwargs: dict[str, Any],
                     on_meta: bool) -> tuple[Any, ...]:
    values = (result,) if len(info.returns) == 1 else (result if result is not None else ())
    if any(isinstance(value, torch.Tensor) and value.layout is not torch.strided for value in values):
        raise NeedsDaemon()  # a sparse result: its nnz depends on data (see sparse.py)
    specs: list[Any] = []
    for kind, source, value in zip(info.returns, info.return_sources, values):
        if kind is Return.NEW:
            if on_meta and isinstance(value, torch.Tensor) and value.device.type == "cpu":
                specs.append(HostResult(value))
                continue
            specs.append(None if value is None else spec_of(value))
        elif kind is Return.NEW_LIST:
            specs.append(tuple(spec_of(item) for item in value))
        elif kind is Return.MUTATED_INPUT:
            # The input after the op: in-place ops such as resize_ or t_ change its metadata.
            mutated = meta_args[source[1]] if source and source[0] == "arg" else meta_kwargs.get(source[1]) if source else value
            specs.append(spec_of(mutated) if isinstance(mutated, torch.Tensor) else None)
        elif kind is Return.SIZE and isinstance(value, int):
            specs.append(value)
        else:
            raise NeedsDaemon()
    return tuple(specs)


# ------------------------------------------------------------------------------------------------
# Meta kernels torch lacks for ops the client sends. Registered on torch's Meta key, so they are
# ordinary shape rules for this process; without them each call would wait for the daemon.
# ------------------------------------------------------------------------------------------------
def _gru_cell_meta(input_gates, hidden_gates, hx, input_bias=None, hidden_bias=None):
    batch, hidden = hx.shape
    return hx.new_empty((batch, hidden)), hx.new_empty((batch, 5 * hidden))


def _gru_cell_backward_meta(grad_hy, workspace, has_bias):
    batch, hidden = grad_hy.shape
    gates = grad_hy.new_empty((batch, 3 * hidden))
    bias = grad_hy.new_empty((3 * hidden,)) if has_bias else None
    return gates, gates.clone(), grad_hy.new_empty((batch, hidden)), bias, None if bias is None else bias.clone()


def _attention_backward_meta(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attn_bias: torch.Tensor | None, grad_input_mask: list[bool], *args: Any,
                             **kwargs: Any) -> tuple[Any, ...]:
    """torch < 2.12 has no meta kernel for the overrideable attention backward (the one
    SDPA uses on the remote device); without it every attention backward waits for a round trip.
    Same shapes as torch's own later kernel."""
    bias_grad = torch.empty_like(attn_bias) if attn_bias is not None and grad_input_mask[3] else None
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value), bias_grad


_META_KERNELS = {
    "_thnn_fused_gru_cell": _gru_cell_meta,
    "_thnn_fused_gru_cell_backward": _gru_cell_backward_meta,
    "_scaled_dot_product_fused_attention_overrideable_backward": _attention_backward_meta,
}
_meta_library: list[torch.library.Library] = []


def register_missing_meta_kernels() -> None:
    if _meta_library:
        return
    native = _prefer_native_meta_kernels()
    if native is not None:
        _meta_library.append(native)
    library = torch.library.Library("aten", "IMPL")
    for name, kernel in _META_KERNELS.items():
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{name}", "Meta"):
            library.impl(name, kernel, "Meta")
    _meta_library.append(library)


def _python_meta_registrations() -> list[tuple[torch._ops.OpOverload, Any]]:
    """The (op, kernel) pairs ``torch._meta_registrations.activate_meta`` registered on the Meta
    key: the same table, in its order of precedence, kept to the ops it registered there."""
    from torch._decomp import global_decomposition_table
    from torch._meta_registrations import _meta_lib_dont_use_me_use_register_meta as library

    table: dict[Any, Any] = {}
    for kind in ("meta", "post_autograd", "pre_autograd"):
        for op, kernel in global_decomposition_table[kind].items():
            table.setdefault(op, kernel)
    registered = library._op_impls
    return [(op, kernel) for op, kernel in table.items()
            if isinstance(op, torch._ops.OpOverload) and _library_key(op) in registered]


def _library_key(op: torch._ops.OpOverload) -> str:
    """How ``torch.library.Library`` records a Meta registration of ``op`` (``aten/div.Tensor/Meta``)."""
    schema = op._schema
    name = schema.name.split("::")[-1] + (f".{schema.overload_name}" if schema.overload_name else "")
    return f"aten/{name}/Meta"


def _has_native_meta_kernel(op: torch._ops.OpOverload) -> bool:
    """A C++ Meta kernel; or a C++ composite kernel that the CPU also runs (no CPU kernel of its
    own, as ``empty_like``), which then runs on meta through other ops. Composite kernels of ops
    with device kernels are generic fallbacks (``native_group_norm``'s views its input where the
    CPU and CUDA kernels need no such thing), and the Meta *fallback* only raises. Pointwise
    composites (``abs``, ``logical_and``) resize an ``out=`` tensor through a Python meta kernel
    inside: the TensorIterator proxy answers them better (:data:`_python_tensor_iterator_ops`)."""
    has, name = torch._C._dispatch_has_kernel_for_dispatch_key, op.name()
    if has(name, "Meta"):
        return True
    if "_overrideable" in name:
        # PyTorch's hooks for backends with kernels of their own (the fused attention SDPA
        # uses on the remote device, ``convolution_overrideable``): their composite kernel is a
        # stub that raises NotImplementedError, so the Python meta kernel is the only one. (Taken
        # off, every attention forward waited for a round trip: NeedsDaemon.)
        return False
    composite_everywhere = has(name, "CompositeExplicitAutograd") and not has(name, "CPU")
    return composite_everywhere and (not _tensor_iterator_op(op) or op._schema.name in _COMPOSITE_OF_SEVERAL_OPS)


def _tensor_iterator_op(op: torch._ops.OpOverload) -> bool:
    """Whether ``op``'s CPU and CUDA kernels allocate its result with one TensorIterator over
    its tensor arguments: pointwise ops (but ``masked_fill``, which clones contiguous first),
    and ``complex``/``polar``, which torch does not tag pointwise."""
    name = op._schema.name
    if name.startswith("aten::masked_fill"):
        return False
    return torch.Tag.pointwise in op.tags or name in ("aten::complex", "aten::polar")


#: Pointwise ops whose composite kernel is more than one TensorIterator pass (``mvlgamma``
#: sums over a new dimension: a contiguous result): the composite itself tells their strides.
_COMPOSITE_OF_SEVERAL_OPS = {"aten::mvlgamma"}


def _prefer_native_meta_kernels() -> torch.library.Library | None:
    """Make the ``meta`` device run torch's C++ meta kernels where torch has them.

    ``torch._meta_registrations`` registers Python kernels (mostly ``torch._refs``
    decompositions, written for symbolic shapes) on the Meta key of ~600 ops that have C++ meta
    kernels, shadowing them. The C++ meta kernel of a structured op *is* the first half of its
    CPU and CUDA kernels (TensorIterator decides the output's strides), but the Python ones
    decide strides their own way: ``x / 1.0`` with ``x`` of shape (1, 32, 8, 8) and strides
    (32, 1, 256, 32) gets (2048, 1, 256, 32) from ``torch._refs`` (its channels-last shortcut
    leaves the wrapped number out) where CPU and CUDA give (32, 1, 256, 32). The client promises
    what meta inference says, the daemon's kernels decide what is real, and a layout-sensitive op
    (``native_group_norm``) then refused the daemon's tensor. So the Python kernels leave the
    Meta key where C++ has an answer (:func:`_has_native_meta_kernel`); the other ops keep
    theirs, corrected where they are known to differ from CUDA's
    (:data:`_python_tensor_iterator_ops`). The Python ones stay registered as the ops'
    ``py_impl(Meta)``, which is what torch's symbolic tracing (with the Python dispatcher on)
    uses."""
    from torch import _meta_registrations

    if not isinstance(getattr(_meta_registrations, "_meta_lib_dont_use_me_use_register_meta", None),
                      torch.library.Library):
        return None  # a torch that registers its Python meta kernels some other way
    pairs = _python_meta_registrations()
    _meta_registrations._meta_lib_dont_use_me_use_register_meta._destroy()
    library = torch.library.Library("aten", "IMPL", "Meta")
    _meta_registrations._meta_lib_dont_use_me_use_register_meta = library  # later registrations
    for op, kernel in pairs:
        if not _has_native_meta_kernel(op):
            library.impl(op, kernel)
            if _tensor_iterator_op(op):
                _python_tensor_iterator_ops.add(op)
    return library


#: TensorIterator ops (:func:`_tensor_iterator_op`) whose only meta kernel is torch's Python one
#: (``relu``, ``abs.out``, ``where.self``, ``mul.Scalar``, ``complex``, ...): their CPU and CUDA
#: kernels allocate the result with TensorIterator, so :func:`_tensor_iterator_strides`
#: recomputes its strides that way.
_python_tensor_iterator_ops: set[torch._ops.OpOverload] = set()

#: Ops with C++ meta kernels that run TensorIterator over 1, 2 or 3 inputs: proxies for it.
_TENSOR_ITERATOR_PROXIES = {
    1: torch.ops.aten.neg.default,
    2: torch.ops.aten.add.Tensor,
    3: torch.ops.aten.addcmul.default,
}


def _tensor_iterator_strides(func: torch._ops.OpOverload, meta_args: tuple[Any, ...],
                             shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The strides TensorIterator gives a result of ``shape`` from ``func``'s operands: its tensor
    arguments, and for the ``Scalar`` overloads of binary ops (``mul.Scalar``, whose kernels wrap
    the number into a 0-dim tensor operand) one 0-dim operand, which turns TensorIterator's
    same-shape shortcut off. Computed by a C++ meta kernel on float stand-ins of the operands
    (strides do not depend on dtypes). ``None`` where no proxy fits."""
    operands = [torch.empty_strided(a.shape, a.stride(), dtype=torch.float32, device=_META)
                for a in meta_args if isinstance(a, torch.Tensor)]
    if "scalar" in func._schema.overload_name.lower():
        operands.append(torch.empty((), dtype=torch.float32, device=_META))
    proxy = _TENSOR_ITERATOR_PROXIES.get(len(operands))
    if proxy is None:
        return None
    try:
        result = proxy(*operands)
    except RuntimeError:
        return None
    return tuple(result.stride()) if tuple(result.shape) == tuple(shape) else None


def _with_tensor_iterator_strides(func: torch._ops.OpOverload, info: OpInfo, specs: tuple[Any, ...],
                                  meta_args: tuple[Any, ...], resized_out: bool) -> tuple[Any, ...]:
    """``specs`` of one of :data:`_python_tensor_iterator_ops`, with the result's strides as its
    kernels pick them: a new result, or an ``out=`` tensor the op resized (one it did not resize keeps its
    own strides, in torch too)."""
    if len(specs) != 1 or type(specs[0]) is not tuple:
        return specs
    if info.returns[0] is Return.MUTATED_INPUT and not resized_out:
        return specs
    dtype, shape, _, offset = specs[0]
    strides = _tensor_iterator_strides(func, meta_args, shape)
    return specs if strides is None else ((dtype, shape, strides, offset),)


def _contiguous_result(specs: tuple[Any, ...], meta_args: tuple[Any, ...]) -> tuple[Any, ...]:
    dtype, shape, _, offset = specs[0]
    return ((dtype, shape, torch.empty(shape, device=_META).stride(), offset),)


def _result_like_input(specs: tuple[Any, ...], meta_args: tuple[Any, ...]) -> tuple[Any, ...]:
    dtype, shape, _, offset = specs[0]
    if tuple(meta_args[0].shape) != tuple(shape):
        return specs  # reduced to a scalar
    return ((dtype, shape, torch.empty_like(meta_args[0]).stride(), offset),)


#: Ops whose only meta kernel is torch's Python one, where the CPU and CUDA kernels (the same
#: code, aten/src/ATen/native/Loss.cpp and Loss.cu) lay the result out otherwise:
#: ``mse_loss_backward`` allocates ``zeros_like(input, LEGACY_CONTIGUOUS_MEMORY_FORMAT)`` (the
#: decomposition's arithmetic keeps a channels-last input's layout), ``binary_cross_entropy``
#: ``empty_like(input)`` (the decomposition's result is contiguous). Otherwise the client
#: promises one layout and the daemon holds another.
_KERNEL_LAYOUTS: dict[Any, Any] = {
    torch.ops.aten.mse_loss_backward.default: _contiguous_result,
    torch.ops.aten.binary_cross_entropy.default: _result_like_input,
}


#: Convolutions, by the positions of the tensors whose layout decides their results' (input and
#: weight; grad_output too for the backward). torch's C++ composite picks its backend by device
#: and cannot run on ``meta`` (it reaches the ``*_overrideable`` stub), and its Python meta
#: kernel decides memory formats unlike the devices' (contiguous where CPU and CUDA give
#: channels-last). Every device backend (``determine_backend_memory_format`` in ATen's
#: Convolution.cpp: cuDNN, MKL-DNN, the slow and depthwise kernels) lays its results out
#: contiguously when those tensors are unambiguously contiguous: those calls are inferred here,
#: shapes from the Python kernel. Any other layout waits for the daemon's answer, as every
#: convolution did before (a round trip for each, forward and backward).
_CONVOLUTIONS: dict[Any, tuple[int, ...]] = {
    torch.ops.aten.convolution.default: (0, 1),
    torch.ops.aten.convolution_backward.default: (0, 1, 2),
}


def _convolution_on_meta(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    kernel = func.py_kernels.get(torch._C.DispatchKey.Meta)
    if kwargs or kernel is None or not all(_plainly_contiguous(args[index]) for index in _CONVOLUTIONS[func]):
        raise NeedsDaemon()
    result = kernel(*args)
    if isinstance(result, torch.Tensor):
        return result.contiguous()
    return tuple(item.contiguous() if isinstance(item, torch.Tensor) else item for item in result)


def _plainly_contiguous(tensor: Any) -> bool:
    """Contiguous, and what the kernels' ``suggest_memory_format`` makes of it is contiguous too
    (a size-1 channel or spatial extent can make a tensor channels-last as well; torch's Python
    mirror of the C++ function decides those as the kernels do)."""
    if not isinstance(tensor, torch.Tensor) or not tensor.is_contiguous():
        return False
    if tensor.dim() not in (4, 5):
        return True  # (no channels-last formats)
    return suggest_memory_format(tensor) == torch.contiguous_format


_DEVICE_MISMATCH = re.compile(r"Tensor on device (\S+) is not on the expected device (\S+)!")


_NATIVE_ERROR_MAX_ELEMENTS = 1 << 22


def _raise_native_error(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Re-raise a user error with torch's own CPU message (meta decompositions word some
    differently, e.g. matmul shape errors), by running the op on zero-filled host tensors of the
    same metadata. Skipped for big tensors; returns if the host run does not fail the same way."""
    total = 0

    def host(value: Any) -> Any:
        nonlocal total
        if isinstance(value, RemoteTensor):
            total += value.numel()
            if total > _NATIVE_ERROR_MAX_ELEMENTS:
                raise OverflowError
            return torch.zeros_like(_stand_in(value, _META), device=_CPU)
        if isinstance(value, (list, tuple)):
            return type(value)(host(item) for item in value)
        if isinstance(value, torch.device) and value.type == backend.BACKEND_NAME:
            return _CPU
        return value

    try:
        host_args = host(args)
        host_kwargs = {key: host(value) for key, value in kwargs.items()}
        func(*host_args, **host_kwargs)
    except OverflowError:
        return
    except RuntimeError as native:
        raise type(native)(str(native)) from None
    except Exception:
        return


def _device_names(message: str) -> str:
    """torch's message, as it reads for CUDA tensors (meta stands in for cuda:0 here)."""
    mismatch = _DEVICE_MISMATCH.search(message)
    if mismatch:
        found, expected = (("cuda:0" if d == "meta" else d) for d in mismatch.groups())
        return (f"Expected all tensors to be on the same device, but found at least two devices, "
                f"{expected} and {found}!")
    return message.replace("device meta", "device cuda:0").replace("meta and", "cuda:0 and").replace(
        "and meta", "and cuda:0").replace("expected device meta", "expected device cuda:0")


def _out_shape(meta_kwargs: dict[str, Any]) -> Any:
    out = meta_kwargs.get("out")
    return tuple(out.shape) if isinstance(out, torch.Tensor) else None


def cached(func: torch._ops.OpOverload, arg_signature: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """What :func:`infer` found before for ``func`` on these positional arguments (keyword
    arguments none), without computing anything."""
    return _cache.get((func, arg_signature, None))


def infer(func: torch._ops.OpOverload, info: OpInfo, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Output specs per return (see :func:`spec_of`); raises :class:`NeedsDaemon` or torch's error."""
    values_matter = not info.pointwise
    key = (
        func,
        tuple([arg._spec if type(arg) is RemoteTensor else signature(arg, values_matter) for arg in args]),
        signature(kwargs, values_matter) if kwargs else None,
    )
    specs = _cache.get(key)
    if specs is not None:
        return specs
    if func in ops_without_meta:
        raise NeedsDaemon()
    # Tensors without elements: infer on real (empty) CPU tensors, which also raises the errors
    # CUDA raises on the host for them (max() of an empty tensor); meta kernels skip those checks.
    device = _CPU if _all_remote_tensors_empty((args, kwargs)) else _META
    meta_args = _stand_in(args, device)
    meta_kwargs = {name: _stand_in(value, device) for name, value in kwargs.items()}
    warnings_before = warning_location.moved
    out_shape = _out_shape(meta_kwargs)
    try:
        if device is _META and func in _CONVOLUTIONS:
            result = _convolution_on_meta(func, meta_args, meta_kwargs)
        else:
            result = func(*meta_args, **meta_kwargs)
    except NotImplementedError:
        ops_without_meta.add(func)
        raise NeedsDaemon() from None
    except RuntimeError as exc:
        message = str(exc)
        lowered = message.lower()
        if "meta" in lowered and "device" not in lowered or "data pointer" in lowered or "data_ptr" in lowered:
            raise NeedsDaemon() from None
        _raise_native_error(func, args, kwargs)
        raise type(exc)(_device_names(message)) from None
    specs = _describe_result(info, result, meta_args, meta_kwargs, on_meta=device is _META)
    if func in _python_tensor_iterator_ops:
        specs = _with_tensor_iterator_strides(func, info, specs, meta_args, out_shape != _out_shape(meta_kwargs))
    elif func in _KERNEL_LAYOUTS and type(specs[0]) is tuple:
        specs = _KERNEL_LAYOUTS[func](specs, meta_args)
    if any(type(spec) is HostResult for spec in specs):
        return specs  # its values come from this call's host arguments: not reusable
    resized_a_nonempty_out = out_shape is not None and 0 not in out_shape and out_shape != _out_shape(meta_kwargs)
    if warning_location.moved != warnings_before or resized_a_nonempty_out:
        # torch warned (a C++ kernel's warning reaches Python only when the program's call
        # returns: a non-empty out= tensor resized is the common one): not cached, so that each
        # call warns, as on CUDA.
        return specs
    if len(_cache) >= _MAX_CACHE:
        _cache.clear()
    _cache[key] = specs
    return specs
