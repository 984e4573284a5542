"""Which ops a client may run on the daemon, and what the daemon must know about each.

The daemon is a security boundary. An op name from the wire resolves only if

* it is in an allowed namespace (``aten``: tensor math; nothing that reaches files, processes or
  the network lives there except the few ops denied below), and
* it is not denied by name: ops that read files (``from_file``), print on the daemon, raise
  device-side assertions (which would poison the CUDA context of every tenant), or index memory
  without bounds checks (``_unsafe_index*``, the ``*_unsafe`` sparse constructors).

Anything that is not a tensor, scalar, dtype, device index, layout or memory format cannot even
be expressed on the wire (no storages, streams, generators, files or Python objects), and device
arguments always name the session's own device.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import zeroing
from .translations import TRANSLATIONS

ALLOWED_NAMESPACES = frozenset({"aten"})

DENIED_OPS = frozenset(
    {
        "from_file",  # reads a file on the daemon's host
        "_print",  # prints on the daemon
        "_assert_async",  # a failed device-side assert poisons the CUDA context for every tenant
        "_functional_assert_async",
        "_assert_scalar",
        "_functional_assert_scalar",
        "_assert_tensor_metadata",
        "record_stream",
        "_unsafe_index",  # no bounds checks: reads or writes outside the tensor
        "_unsafe_index_put",
        "_unsafe_masked_index",
        "_unsafe_masked_index_put_accumulate",
        "_sparse_coo_tensor_unsafe",
        "_sparse_csr_tensor_unsafe",
        "_sparse_csc_tensor_unsafe",
        "_sparse_bsr_tensor_unsafe",
        "_sparse_bsc_tensor_unsafe",
        "_sparse_compressed_tensor_unsafe",
        "_nested_view_from_buffer",
        "_nested_view_from_buffer_copy",
    }
)
DENIED_PREFIXES = ("_test_",)

_NAME = re.compile(r"^(?P<ns>[a-z_][a-z0-9_]*)::(?P<op>[A-Za-z_][A-Za-z0-9_]*)(\.(?P<overload>[A-Za-z_][A-Za-z0-9_]*))?$")


class OpRefused(Exception):
    """The op is not one a client may run here."""


@dataclass(frozen=True)
class OpEntry:
    """An allowed op, resolved once per daemon and shared by every session."""

    name: str
    overload: torch._ops.OpOverload
    #: What runs: the overload itself, or a translation for ops the device has no kernel for.
    call: Callable[..., Any]
    #: The schema has a ``Generator? generator`` argument: inject the session's generator.
    takes_generator: bool
    #: Draws random numbers without a generator argument: run under the session's RNG state.
    seeded_without_generator: bool
    #: Returns uninitialised memory (``*empty*``): the daemon zeroes its fresh results'
    #: storages (server/zeroing.py).
    zero_fill_result: bool
    #: Arguments the op writes to, as ("arg", position) or ("kwarg", name), when it may change
    #: their storage's size (resize_, set_, out= arguments): memory is re-measured after it.
    resized_arguments: tuple[tuple[str, Any], ...] = ()
    sanitize: Callable[[list[Any], dict[str, Any]], None] | None = None
    #: A foreach op that returns nothing (in place) or one tensor per index: under
    #: oversubscription it may run on slices of its lists (server/foreach_chunks.py).
    foreach: bool = False
    #: The schema returns exactly one (non-optional) Tensor: results are stored without unpacking.
    returns_one_tensor: bool = False


def _force_safe_index_put(args: list[Any], kwargs: dict[str, Any]) -> None:
    # _index_put_impl_(self, indices, values, accumulate=False, unsafe=False): never unsafe.
    if len(args) > 4:
        args[4] = False
    kwargs.pop("unsafe", None)


_SANITIZERS: dict[str, Callable[[list[Any], dict[str, Any]], None]] = {
    "aten::_index_put_impl_": _force_safe_index_put,
}

_cache: dict[str, OpEntry] = {}


def resolve(name: str) -> OpEntry:
    """The :class:`OpEntry` for a schema name like ``aten::add.Tensor``, or :class:`OpRefused`."""
    entry = _cache.get(name)
    if entry is not None:
        return entry
    match = _NAME.match(name) if isinstance(name, str) else None
    if match is None:
        raise OpRefused(f"{name!r} is not an op name (expected namespace::op[.overload])")
    namespace, op_name = match["ns"], match["op"]
    overload_name = match["overload"] or "default"
    if namespace not in ALLOWED_NAMESPACES:
        raise OpRefused(f"{name}: namespace {namespace!r} is not allowed on this daemon")
    if op_name in DENIED_OPS or op_name.startswith(DENIED_PREFIXES):
        raise OpRefused(f"{name} is refused by the daemon's op policy")
    try:
        # Look the name up in the dispatcher's registry first: only registered ops resolve, never
        # an arbitrary attribute of torch.ops (names like __class__ included).
        torch._C._dispatch_find_schema_or_throw(f"{namespace}::{op_name}", "" if overload_name == "default" else overload_name)
        packet = getattr(getattr(torch.ops, namespace), op_name)
        overload = getattr(packet, overload_name)
    except (AttributeError, RuntimeError):
        raise OpRefused(
            f"{name} does not exist in the daemon's torch {torch.__version__}"
        ) from None
    if not isinstance(overload, torch._ops.OpOverload):
        raise OpRefused(f"{name} is not an op overload")
    schema = overload._schema
    takes_generator = any(arg.name == "generator" for arg in schema.arguments)
    resizing_op = op_name in zeroing.SIZE_ONLY_OPS
    resized = tuple(
        ("kwarg", arg.name) if arg.kwarg_only else ("arg", position)
        for position, arg in enumerate(schema.arguments)
        if arg.alias_info is not None and arg.alias_info.is_write and (arg.kwarg_only or resizing_op)
    )
    seeded = torch.Tag.nondeterministic_seeded in overload.tags
    entry = OpEntry(
        name=name,
        overload=overload,
        # The overload's C++ callable: one Python frame less per op than OpOverload.__call__.
        call=TRANSLATIONS.get(f"{namespace}::{op_name}") or zeroing.TRANSLATIONS.get(f"{namespace}::{op_name}", overload._op),
        takes_generator=takes_generator,
        seeded_without_generator=seeded and not takes_generator,
        zero_fill_result=zeroing.returns_uninitialised(op_name),
        resized_arguments=resized,
        sanitize=_SANITIZERS.get(f"{namespace}::{op_name}"),
        foreach=op_name.startswith("_foreach_") and (
            not schema.returns or (len(schema.returns) == 1 and str(schema.returns[0].type) == "List[Tensor]")),
        returns_one_tensor=len(schema.returns) == 1 and isinstance(schema.returns[0].type, torch._C.TensorType),
    )
    _cache[name] = entry
    return entry
