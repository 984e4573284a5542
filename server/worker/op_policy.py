"""Which ops a client may run on the daemon, and what the daemon must know about each.

The daemon is a security boundary. An op name from the wire resolves only if it names a
registered overload that a rule of :mod:`server.op_rules` allows: the rules classify every aten
overload from facts of its schema (types, alias annotations, tags, name) and allow families whose
kernels check their inputs (pointwise, reductions, views computed from their input, factories,
in-place and ``out=`` forms, dense kernels, queries); anything no rule allows is refused. Read
op_rules' docstring for the rules and why each holds.

An allowed op may still need per-call checks of its arguments (enum values, devices, explicit
view geometry): :func:`op_rules.argument_checker` builds them once per overload, and
``OpEntry.check_arguments`` is None for the ops that need none, so the hot path of most ops pays
nothing. Results are checked where the session stores them (``values.unstorable``).

Anything that is not a tensor, scalar, string, dtype, device index, layout or memory format cannot
even be expressed on the wire (no storages, streams, generators, files or Python objects).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import op_rules, zeroing
from .translations import TRANSLATIONS

ArgumentRefused = op_rules.ArgumentRefused

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
    #: The schema has a ``Generator? generator`` argument: inject the session's generator
    #: unless the client named one of its own (``torch.Generator("cuda")``).
    takes_generator: bool
    #: Draws random numbers without a generator argument: run under the session's RNG state.
    seeded_without_generator: bool
    #: Returns uninitialised memory (``*empty*``): the daemon zeroes its fresh results'
    #: storages (server/zeroing.py).
    zero_fill_result: bool
    #: Sizes its results by their data (``dynamic_output_shape``): what a fresh result's
    #: storage holds beyond its elements is zeroed (server/zeroing.py).
    trims_results: bool = False
    #: Arguments the op writes to, as ("arg", position) or ("kwarg", name), when it may change
    #: their storage's size (resize_, set_, out= arguments): memory is re-measured after it.
    resized_arguments: tuple[tuple[str, Any], ...] = ()
    sanitize: Callable[[list[Any], dict[str, Any]], None] | None = None
    #: A foreach op that returns nothing (in place) or one tensor per index: under
    #: oversubscription it may run on slices of its lists (server/foreach_chunks.py).
    foreach: bool = False
    #: The schema returns exactly one (non-optional) Tensor: results are stored without unpacking.
    returns_one_tensor: bool = False
    #: The op_rules rule that allowed the op.
    rule: str = ""
    #: Per-call checks of the arguments (raise :class:`ArgumentRefused`), given the session's
    #: devices; None for ops whose arguments need none.
    check_arguments: Callable[[list[Any], dict[str, Any], Sequence[torch.device]], None] | None = None
    #: Where a ``generator`` that is not keyword-only sits among the positional arguments
    #: (``poisson``, ``binomial``, ``_standard_gamma``...); None when it is keyword-only or absent.
    generator_at: int | None = None
    #: Every argument the op writes (``Tensor(a!)``), as ("arg", position) or ("kwarg", name):
    #: a sparse tensor among them is charged and checked again after the op (sparse.py).
    written_arguments: tuple[tuple[str, Any], ...] = ()


def _unsafe_flag_forced_off(schema: torch.FunctionSchema) -> Callable[[list[Any], dict[str, Any]], None] | None:
    """A sanitizer for ops with a ``bool unsafe`` argument (``_index_put_impl_``,
    ``segment_reduce``): it turns their bounds checks off, so the daemon always passes False."""
    for position, argument in enumerate(schema.arguments):  # noqa: B007 (force_safe uses it after the loop)
        if argument.name == "unsafe" and str(argument.real_type) == "bool":
            break
    else:
        return None

    def force_safe(args: list[Any], kwargs: dict[str, Any]) -> None:
        if len(args) > position:
            args[position] = False
        kwargs.pop("unsafe", None)

    return force_safe


_cache: dict[str, OpEntry] = {}
#: Whether the rules decide (always, but in tests that prove the process boundary holds without
#: them: ``libremote-server --unsafe-no-op-rules`` makes every aten op resolve, unchecked).
_rules_enforced = True


def enforce_rules(on: bool) -> None:
    """Turn the op rules (allowlist, per-call argument checks, sanitizers) on or off for this
    worker process. Off is for tests only: tenants must stay apart without the rules."""
    global _rules_enforced
    _rules_enforced = on
    _cache.clear()


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
    if namespace != "aten":
        raise OpRefused(f"{name}: namespace {namespace!r} is not allowed on this daemon (aten ops only)")
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
    _, rule = op_rules.classify(overload)
    if not _rules_enforced:
        rule = op_rules.UNCHECKED
    if not rule.allows:
        raise OpRefused(f"{name} is refused by the daemon's op policy ({rule.name}: {rule.why})")
    schema = overload._schema
    takes_generator = any(arg.name == "generator" for arg in schema.arguments)
    generator_at = next((position for position, arg in enumerate(schema.arguments)
                         if arg.name == "generator" and not arg.kwarg_only), None)
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
        trims_results=torch.Tag.dynamic_output_shape in overload.tags,
        resized_arguments=resized,
        sanitize=_unsafe_flag_forced_off(schema) if _rules_enforced else None,
        foreach=op_name.startswith("_foreach_") and (
            not schema.returns or (len(schema.returns) == 1 and str(schema.returns[0].type) == "List[Tensor]")),
        returns_one_tensor=len(schema.returns) == 1 and isinstance(schema.returns[0].type, torch._C.TensorType),
        rule=rule.name,
        check_arguments=op_rules.argument_checker(overload, rule) if _rules_enforced else None,
        generator_at=generator_at,
        written_arguments=tuple(
            ("kwarg", arg.name) if arg.kwarg_only else ("arg", position)
            for position, arg in enumerate(schema.arguments)
            if arg.alias_info is not None and arg.alias_info.is_write),
    )
    _cache[name] = entry
    return entry
