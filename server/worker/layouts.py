"""Dense layouts: whether strides lay a shape out without gaps or overlaps.

Below every module that asks (values.py, zeroing.py, the commands of a session): a layout fact
needs nothing but torch.
"""

from __future__ import annotations

from typing import Any

import torch


def is_dense(tensor: torch.Tensor, *, any_offset: bool = False) -> bool:
    """Non-overlapping and dense (from offset 0 unless ``any_offset``): its elements fill one
    contiguous span of its storage."""
    return (any_offset or tensor.storage_offset() == 0) and is_dense_layout(list(tensor.shape), list(tensor.stride()))


def is_dense_layout(shape: list[Any], stride: list[Any]) -> bool:
    """Whether ``stride`` lays ``shape`` out without gaps or overlaps (some permutation of
    contiguous): the storage then holds exactly numel elements."""
    if len(shape) != len(stride) or not all(isinstance(v, int) and v >= 0 for v in [*shape, *stride]):
        return False
    expected = 1
    for size, step in sorted(zip(shape, stride), key=lambda pair: pair[1]):
        if size == 1:
            continue
        if size == 0:
            return True
        if step != expected:
            return False
        expected *= size
    return True
