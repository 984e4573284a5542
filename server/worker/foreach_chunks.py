"""Running an in-place foreach op in chunks when its operands do not fit the device budget.

An optimizer's ``foreach`` step names every parameter, gradient and state tensor in one op
(``_foreach_addcdiv_(params, exp_avgs, denoms, ...)``). Under oversubscription the operands of an
op must be resident together, so one such op can need several times the device budget at once,
and spills everything else to get it. But a foreach op is the same op applied index by index:
element *i* of the result depends only on element *i* of each list. So the daemon runs it on
consecutive slices of the lists, each of which fits, with the same result.

Only in-place foreach ops (they return nothing) are split: their results are their inputs, which
the memory manager already tracks. Out-of-place ones create their outputs inside the op, where
the budget cannot see them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


def slices(args: list[Any], kwargs: dict[str, Any], index_bytes: list[int],
           limit: int) -> list[tuple[int, int]] | None:
    """Index ranges whose operands (``index_bytes`` per index) take at most ``limit`` bytes each
    (a range of one index may take more), or None when the op's arguments cannot be split by
    index."""
    length = _list_length(args, kwargs)
    if length is None or length < 2 or length != len(index_bytes):
        return None
    ranges: list[tuple[int, int]] = []
    start, taken = 0, 0
    for index in range(length):
        size = index_bytes[index]
        if index > start and taken + size > limit:
            ranges.append((start, index))
            start, taken = index, 0
        taken += size
    ranges.append((start, length))
    return ranges if len(ranges) > 1 else None


def arguments(args: list[Any], kwargs: dict[str, Any], start: int, stop: int) -> tuple[list[Any], dict[str, Any]]:
    """The op's arguments for indices ``start:stop``."""
    length = _list_length(args, kwargs)
    return ([_slice(value, start, stop, length) for value in args],
            {key: _slice(value, start, stop, length) for key, value in kwargs.items()})


def tensor_lists(args: list[Any], kwargs: dict[str, Any]) -> Iterator[list[torch.Tensor]]:
    for value in (*args, *kwargs.values()):
        if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            yield value


def _list_length(args: list[Any], kwargs: dict[str, Any]) -> int | None:
    """The common length of the op's lists; None if they differ or another argument is a tensor
    that is neither a scalar nor one value per index."""
    lengths = {len(value) for value in (*args, *kwargs.values()) if isinstance(value, list)}
    if len(lengths) != 1:
        return None
    length = lengths.pop()
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != (length,):
            return None
    return length


def _slice(value: Any, start: int, stop: int, length: int | None) -> Any:
    if isinstance(value, list):
        return value[start:stop]
    if isinstance(value, torch.Tensor) and value.dim() == 1 and value.shape[0] == length:
        return value[start:stop]  # one scalar per index (``scalars`` of the .Tensor overloads)
    return value
