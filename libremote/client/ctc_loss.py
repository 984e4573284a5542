"""``ctc_loss`` with length tensors, as CUDA runs it.

Layer 4, the torch-facing facade: a case of the device mode (:mod:`.device_map`).

ATen's ``ctc_loss.Tensor`` (LossCTC.cpp) has two paths. For plain tensors it copies
``input_lengths`` and ``target_lengths`` to the host as integer lists and takes the ``IntList``
overload, which builds its own device tensor of the lengths for the ``mean`` reduction; so on a
real GPU the lengths may live on the host or the device. For tensor subclasses (a remote tensor
is one) it takes a "composite compliant" path instead, which divides the device loss by the
length tensor itself: with lengths on the host, the usual case, that is a device mismatch CUDA
never raises. The hook below gives every call the plain-tensor path: lengths become lists (a
remote length tensor is fetched, the sync CUDA's path makes too) before torch sees the call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .tensor import RemoteTensor

#: Positions of the length arguments in ``ctc_loss(log_probs, targets, input_lengths, target_lengths, ...)``.
_LENGTHS = ((2, "input_lengths"), (3, "target_lengths"))


def _as_list(lengths: Any) -> Any:
    """A host or remote tensor of lengths as a list of ints; anything else unchanged (lists, and
    the fake tensors of a graph-mode trace, which have no values to read)."""
    if type(lengths) is RemoteTensor or (type(lengths) is torch.Tensor and lengths.device.type == "cpu"):
        return lengths.tolist()
    return lengths


def ctc_loss(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if not any(isinstance(value, RemoteTensor) for value in (*args[:2], kwargs.get("log_probs"))):
        return func(*args, **kwargs)
    args = list(args)
    for position, name in _LENGTHS:
        if position < len(args):
            args[position] = _as_list(args[position])
        elif name in kwargs:
            kwargs[name] = _as_list(kwargs[name])
    return func(*args, **kwargs)


HOOKS: dict[Any, Callable[..., Any]] = {
    torch.nn.functional.ctc_loss: ctc_loss,
    torch.ctc_loss: ctc_loss,
}
