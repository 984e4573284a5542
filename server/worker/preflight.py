"""A session's quota, checked before an op allocates.

The daemon used to run an op and compare the session's memory with its quota afterwards, so a
session under a 64 MiB quota could make the daemon allocate 1 GiB (``torch.empty``,
``x.expand(...).contiguous()``, ``repeat``) before the op was undone: memory other tenants may
have needed at that moment, or more than the device has. The client infers every output's
metadata with meta kernels too, but the daemon cannot trust what a client says, so it runs the
op's meta kernel itself (on ``meta`` copies of the arguments, sharing storages as the real ones do)
and refuses the op when what it would allocate does not fit.

A meta kernel costs 2-300 µs in Python (pointwise ops go through torch's Python meta functions),
against ~8 µs for the whole of a daemon's per-op work, so it runs only where it can matter. The
rule, from each op's schema (worked out once per op, :class:`Sizing`):

* An op that returns only views of its arguments, or nothing, and resizes nothing, allocates
  nothing to check (views, in-place ops).
* Factories (no tensor arguments: ``empty``, ``zeros``, ``full``, ``arange``, ``rand*``...) always
  run their meta kernel: their size is in their arguments, and their meta kernels are the cheap
  ones (2-20 µs). So do the few ops whose output grows faster than their inputs in ways a schema
  does not show (:data:`PRODUCT_OPS`: ``diag`` of a vector, ``combinations``, ``einsum``).
* For every other op a cheap bound comes first: 16 bytes (the widest dtype) per element of its
  tensor arguments as the op sees them (``numel``: an expanded view counts in full, so
  ``expand(...).contiguous()`` is seen), per tensor it returns, times ``1 + |n|`` for each integer
  it takes in a size-like position (``repeat``'s repeats, ``new_*``'s sizes, padding, ``one_hot``'s
  classes), with two refinements: an op combining several tensors (``mm``, convolutions,
  ``embedding``, ``index_select``, ``kron``: outputs may grow with the *product* of their inputs'
  sizes) takes the product of their element counts; a pointwise op takes that product too, and
  its inputs' broadcast shape only when the product does not fit (the product is a looser bound,
  and cheaper to take). An empty tensor counts its sizes with each 0 taken as 1 (``mm`` of a
  1000x0 and a 0x1000 matrix makes a million zeros). Only when the
  bound does not fit in what the session has left does the meta kernel run, and its answer (the
  bytes of every fresh result storage, plus what existing storages grow by) is what is checked.
  Answers are cached per op and argument layout, since a training loop asks the same ones every
  step.
* Where the meta kernel cannot answer (output sizes that depend on the data: ``nonzero``,
  ``unique``; a quantized argument), the op runs and the check after it catches what it made
  (``Session._refuse_over_quota``), as before. ``bincount``, ``one_hot(num_classes=-1)`` and
  ``repeat_interleave`` with a tensor of repeats, whose outputs are not bounded by their inputs,
  are sized from their data first, always (:func:`_data_dependent_elements`: one more pass over
  an input of ops that read it to size their output anyway).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from . import zeroing

#: Bytes per element of the widest dtype (complex128): a bound for any result's element size.
WIDEST_ELEMENT = 16
#: Ops whose output may grow faster than their inputs although the schema does not say so: one
#: tensor argument (``diag`` of a vector is a matrix) or one list of them (``einsum``).
PRODUCT_OPS = frozenset({"diag", "diag_embed", "diagflat", "combinations", "_pdist_forward", "vander",
                         "cartesian_prod", "block_diag", "einsum", "chain_matmul", "linalg_multi_dot",
                         "_trilinear", "tensordot", "kron"})
#: Ops whose output size comes from their data, unbounded by their inputs' sizes.
SIZED_BY_DATA = frozenset({"bincount", "one_hot", "repeat_interleave"})
#: Integer arguments that are never sizes (they pick dimensions or flags), by name.
_NOT_SIZES = frozenset({"dim", "dims", "dim0", "dim1", "dim2", "start_dim", "end_dim", "source", "destination",
                        "diagonal", "groups", "correction", "unbiased", "keepdim", "ignore_index",
                        "reduction", "padding_idx", "index", "p", "ord", "scale", "zero_point", "axis"})
#: Schema types of integer arguments (``real_type``: dtypes and memory formats are not ints there).
_INTEGERS = re.compile(r"(Optional\[)?(List\[)?(int|SymInt)\]?\]?")
#: Answers of meta kernels kept: op and argument layout -> bytes.
CACHE_ENTRIES = 4096


@dataclass(frozen=True)
class Sizing:
    """What an op's schema says about the memory it may allocate."""

    #: Returns a tensor that is not a view of an argument, or may resize an argument's storage.
    allocates: bool
    #: Always asks the meta kernel: a factory, or one of PRODUCT_OPS.
    exact_only: bool
    factory: bool  # no tensor arguments at all
    tensor_returns: int
    #: Bytes per input element in the cheap bound: the widest element, per tensor returned.
    scale: int
    #: Positions ("arg", i) / ("kwarg", name) of integer arguments that may size an output.
    size_arguments: tuple[tuple[str, Any], ...]
    pointwise: bool
    #: The output may grow with the product of the inputs' sizes (see the module docstring).
    multiplies: bool
    #: May grow a storage an argument uses (``resize_``, ``set_``, ``out=``): the meta kernel's
    #: answer then depends on storage sizes and sharing, not only on shapes.
    grows: bool
    #: Sized by its data beyond what its inputs' sizes bound (:func:`_data_dependent_elements`).
    sized_by_data: bool
    op_name: str
    overload_name: str


_sizings: dict[str, Sizing] = {}
_answers: dict[tuple[Any, ...], int | None] = {}  # (insertion order: the oldest goes first)


def sizing_of(entry: Any) -> Sizing:
    """The :class:`Sizing` of an ``OpEntry`` (worked out once per op)."""
    sizing = _sizings.get(entry.name)
    if sizing is None:
        sizing = _sizings[entry.name] = _sizing(entry)
    return sizing


def _sizing(entry: Any) -> Sizing:
    schema = entry.overload._schema
    op_name = schema.name.split("::", 1)[-1]
    tensor_types = (torch._C.TensorType, torch._C.OptionalType, torch._C.ListType)

    def is_tensor_like(kind: Any) -> bool:
        text = str(kind)
        return isinstance(kind, tensor_types) and "Tensor" in text

    tensor_arguments = [arg for arg in schema.arguments if is_tensor_like(arg.type)]
    fresh_returns = [ret for ret in schema.returns if is_tensor_like(ret.type) and ret.alias_info is None]
    size_arguments = tuple(
        ("kwarg", arg.name) if arg.kwarg_only else ("arg", position)
        for position, arg in enumerate(schema.arguments)
        if _INTEGERS.fullmatch(str(arg.real_type)) and arg.name not in _NOT_SIZES
    )
    returns = max(1, len([ret for ret in schema.returns if is_tensor_like(ret.type)]))
    return Sizing(
        allocates=bool(fresh_returns) or bool(entry.resized_arguments),
        exact_only=not tensor_arguments or op_name in PRODUCT_OPS,
        factory=not tensor_arguments,
        tensor_returns=returns,
        scale=returns * WIDEST_ELEMENT,
        size_arguments=size_arguments,
        pointwise=torch.Tag.pointwise in entry.overload.tags,
        # (A single list, as cat's or a foreach op's, adds up: its results are no larger.)
        multiplies=torch.Tag.pointwise not in entry.overload.tags and len(tensor_arguments) > 1,
        grows=bool(entry.resized_arguments),
        sized_by_data=op_name in SIZED_BY_DATA,
        op_name=op_name,
        overload_name=entry.overload._overloadname,
    )


def needed_bytes(entry: Any, args: list[Any], kwargs: dict[str, Any], headroom: int) -> int | None:
    """What the op would allocate, if that may exceed ``headroom`` bytes and can be known before
    running it; None when it surely fits (or cannot be known: the check after the op remains)."""
    sizing = sizing_of(entry)
    if not sizing.allocates:
        return None
    if not sizing.exact_only and not sizing.sized_by_data:
        bound = cheap_bound(sizing, args, kwargs, headroom)
        if bound <= headroom:
            return None
    if _sparse_arguments(args, kwargs):
        return None  # a sparse argument: meta kernels cannot size the results (nnz); checked after the op
    if sizing.sized_by_data:
        elements = _data_dependent_elements(sizing, args, kwargs)
        if elements is not None:
            return elements * WIDEST_ELEMENT * sizing.tensor_returns
    answer = meta_bytes(entry, sizing, args, kwargs)
    if answer is None and sizing.factory:
        answer = _explicit_size_bound(sizing, args, kwargs)  # a factory with no meta kernel (quantized)
    return answer


def _sparse_arguments(args: list[Any], kwargs: dict[str, Any]) -> bool:
    """Whether a (non-strided) sparse tensor is among the arguments, lists included."""
    for value in (*args, *kwargs.values()):
        for item in (value if type(value) is list else (value,)):
            if isinstance(item, torch.Tensor) and item.layout is not torch.strided:
                return True
    return False


def cheap_bound(sizing: Sizing, args: list[Any], kwargs: dict[str, Any], headroom: int) -> int:
    """An upper bound of the bytes the op allocates, from its arguments' element counts and
    size-like integers alone (see the module docstring). On every op's path: kept lean (the
    daemon's tensors are plain ``torch.Tensor``s, so an exact type test suffices). A pointwise
    op's broadcast shape is worked out only when the product of its inputs' element counts, a
    looser bound, does not fit in ``headroom``: for the usual op it does, at a fraction of the cost."""
    tensors = [value for value in args if type(value) is _Tensor]
    if len(tensors) != len(args) or kwargs:
        _add_listed_and_keyword_tensors(tensors, args, kwargs)
    if sizing.multiplies or (sizing.pointwise and len(tensors) > 1):
        elements = 1
        for tensor in tensors:
            elements *= tensor.numel() or _extent(tensor)
    else:
        elements = sum([tensor.numel() or _extent(tensor) for tensor in tensors])
    bound = (elements or 1) * sizing.scale
    if sizing.size_arguments:
        bound = _times_size_arguments(sizing, args, kwargs, bound)
    if bound > headroom and sizing.pointwise and len(tensors) > 1:  # (pointwise ops never multiply)
        elements = _broadcast_elements([tensor.shape for tensor in tensors])
        bound = _times_size_arguments(sizing, args, kwargs, (elements or 1) * sizing.scale)
    return bound


def _extent(tensor: torch.Tensor) -> int:
    """An empty tensor's sizes multiplied with each 0 taken as 1: what it may contribute to an
    output all the same (``mm`` of a 1000x0 and a 0x1000 matrix makes 1000x1000 zeros)."""
    extent = 1
    for size in tensor.shape:
        extent *= max(size, 1)
    return extent


def _times_size_arguments(sizing: Sizing, args: list[Any], kwargs: dict[str, Any], bound: int) -> int:
    for where, key in sizing.size_arguments:
        value = (args[key] if key < len(args) else None) if where == "arg" else kwargs.get(key)
        for number in (value if type(value) is list else (value,)):
            if type(number) is int:
                bound *= 1 + abs(number)
    return bound


def _add_listed_and_keyword_tensors(tensors: list[torch.Tensor], args: list[Any], kwargs: dict[str, Any]) -> None:
    for value in args:
        if type(value) is list:
            tensors.extend([item for item in value if type(item) is _Tensor])
    for value in kwargs.values():
        if type(value) is _Tensor:
            tensors.append(value)
        elif type(value) is list:
            tensors.extend([item for item in value if type(item) is _Tensor])


_Tensor = torch.Tensor


def _explicit_size_bound(sizing: Sizing, args: list[Any], kwargs: dict[str, Any]) -> int | None:
    """For a factory: the elements its size arguments ask for, at the widest element size (None
    when it has none, as ``arange``, whose size comes from scalars)."""
    if not sizing.size_arguments:
        return None
    elements = 1
    for where, key in sizing.size_arguments:
        value = (args[key] if key < len(args) else None) if where == "arg" else kwargs.get(key)
        for number in (value if type(value) is list else (value,)):
            if type(number) is int:
                elements *= max(number, 0)
    return elements * sizing.scale


def _broadcast_elements(shapes: list[torch.Size]) -> int:
    """The element count of the shapes broadcast together (an upper bound if they do not)."""
    if len(shapes) == 2:  # the common case, and its common forms: equal, or one a suffix (a bias)
        longer, shorter = shapes if len(shapes[0]) >= len(shapes[1]) else (shapes[1], shapes[0])
        if longer[len(longer) - len(shorter):] == shorter:
            return longer.numel()
    rank = max([len(shape) for shape in shapes])
    elements = 1
    for back in range(1, rank + 1):
        elements *= max([shape[-back] for shape in shapes if len(shape) >= back])
    return elements


def _data_dependent_elements(sizing: Sizing, args: list[Any], kwargs: dict[str, Any]) -> int | None:
    """Elements of the output of the ops whose size comes from their data and is not bounded by
    their inputs' sizes, read from the data (one sync; these ops sync anyway); else None."""
    op_name, overload = sizing.op_name, sizing.overload_name
    first = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if first is None or first.numel() == 0 or first.is_floating_point() or first.is_complex():
        return None
    if op_name == "bincount":
        minlength = args[2] if len(args) > 2 else kwargs.get("minlength", 0)
        return max(int(first.max()) + 1, int(minlength or 0))
    if op_name == "one_hot":
        classes = args[1] if len(args) > 1 else kwargs.get("num_classes", -1)
        if classes == -1:
            return first.numel() * (int(first.max()) + 1)
        return None
    if op_name == "repeat_interleave" and overload in ("Tensor", "self_Tensor"):
        repeats = first if overload == "Tensor" else (args[1] if len(args) > 1 else None)
        if isinstance(repeats, torch.Tensor) and not repeats.is_floating_point():
            rows = 1 if overload == "Tensor" else max(first.numel() // max(repeats.numel(), 1), 1)
            return int(repeats.sum()) * rows
    return None


# ------------------------------------------------------------------------------------------------
# The meta kernel's answer
# ------------------------------------------------------------------------------------------------
def meta_bytes(entry: Any, sizing: Sizing, args: list[Any], kwargs: dict[str, Any]) -> int | None:
    """The bytes the op allocates, from its meta kernel: every fresh result storage, plus what
    argument storages grow by. None when the meta kernel cannot say."""
    key = _layout_key(entry.name, args, kwargs, with_storages=sizing.grows)
    try:
        answer = _answers.get(key, _UNKNOWN)
    except TypeError:  # something in the arguments is not hashable: ask, and keep nothing
        return _run_meta(entry, args, kwargs)
    if answer is _UNKNOWN:
        answer = _answers[key] = _run_meta(entry, args, kwargs)
        if len(_answers) > CACHE_ENTRIES:
            del _answers[next(iter(_answers))]  # the oldest
    return answer  # type: ignore[return-value]


_UNKNOWN = object()


def _layout_key(name: str, args: list[Any], kwargs: dict[str, Any], *, with_storages: bool) -> tuple[Any, ...]:
    """What the meta kernel's answer depends on: shapes, strides and dtypes of the tensors, and the
    other arguments; ``with_storages``: also their offsets, storage sizes and sharing (for ops
    that may grow a storage). A flat loop: ops that combine tensors ask this on every call while the product bound does
    not fit."""
    storages: dict[int, int] = {}

    def part(value: Any) -> Any:
        kind = type(value)
        if kind is _Tensor:
            if not with_storages:
                return (value.shape, value.stride(), value.dtype)
            storage = value.untyped_storage()
            group = storages.setdefault(storage._cdata, len(storages))
            return (value.shape, value.stride(), value.storage_offset(), value.dtype, storage.nbytes(), group)
        if kind is list:
            return tuple([part(item) for item in value])
        if kind is torch.Generator:
            return None
        return value

    return (name, *[part(value) for value in args], *[(k, part(v)) for k, v in kwargs.items()])


def _run_meta(entry: Any, args: list[Any], kwargs: dict[str, Any]) -> int | None:
    storages: dict[int, tuple[torch.UntypedStorage, int]] = {}  # real storage -> (meta storage, real bytes)

    def to_meta(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            meta = storages.get(storage._cdata)
            if meta is None:
                nbytes = storage.nbytes()
                meta = storages[storage._cdata] = (
                    torch.empty(nbytes, dtype=torch.uint8, device="meta").untyped_storage(), nbytes)
            return torch.empty(0, dtype=value.dtype, device="meta").set_(
                meta[0], value.storage_offset(), value.shape, value.stride())
        if isinstance(value, list):
            return [to_meta(item) for item in value]
        if isinstance(value, torch.device):
            return torch.device("meta")
        if isinstance(value, torch.Generator):
            return None
        return value

    try:
        meta_args = [to_meta(value) for value in args]
        meta_kwargs = {name: to_meta(value) for name, value in kwargs.items()}
        device_at = _device_position(entry)
        if device_at is not None and device_at >= len(meta_args):
            meta_kwargs["device"] = torch.device("meta")  # not given: the op would use the CPU
        if meta_kwargs.get("pin_memory"):
            meta_kwargs["pin_memory"] = False  # (no pinned meta memory; the sizes are the same)
        result = entry.overload(*meta_args, **meta_kwargs)
    except Exception:  # no meta kernel, data-dependent sizes, a bad argument: the op itself will say
        return None
    grown = sum(max(0, meta.nbytes() - real) for meta, real in storages.values())
    known = {meta._cdata for meta, _ in storages.values()}
    fresh = 0
    for tensor in zeroing.tensors_of(result):
        storage = tensor.untyped_storage()
        if storage._cdata not in known:
            known.add(storage._cdata)
            fresh += storage.nbytes()
    return grown + fresh


def _device_position(entry: Any) -> int | None:
    """Where the op's ``device`` argument is in its schema, if it has one."""
    for position, arg in enumerate(entry.overload._schema.arguments):
        if arg.name == "device":
            return position
    return None
