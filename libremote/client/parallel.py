"""``torch.nn.parallel.comm`` for remote devices: what ``nn.DataParallel`` moves between GPUs.

Layer 4, the torch-facing facade: :mod:`.patches` puts these in ``torch.nn.parallel.comm``.

DataParallel scatters its inputs over the devices, replicates the module (a coalesced broadcast
of parameters and buffers), and gathers the outputs; backward reduces the replicas' gradients.
torch does each of those in C++ for CUDA tensors (``torch._C._scatter`` and friends, absent from
a CPU build). Here they are plain tensor ops on remote tensors, with the results torch's versions
give: chunks and broadcast copies on each target device, the input itself (not a copy) where it
already lives on the target (torch/csrc/cuda/comm.cpp does the same), sums on the destination.
Copies between two devices of one daemon stay on the daemon.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from . import backend


def _target(device: Any) -> torch.device:
    """A device argument of these functions (an index, a device, ``-1`` or ``"cpu"`` for the host)
    as the device to copy to: the remote device itself, not ``cuda``, because backward runs these
    inside autograd functions, where the torch-function mode that maps ``cuda`` is not asked."""
    if device is None:
        return backend.device(torch.cuda.current_device())
    if isinstance(device, str):
        device = torch.device(device)
    if device == -1 or (isinstance(device, torch.device) and device.type == "cpu"):
        return torch.device("cpu")
    if isinstance(device, int):
        return backend.device(device)
    return backend.device(device.index or 0)


def _on(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``: itself if already there (comm.cpp's contract), else a copy."""
    if device.type == "cpu":
        return tensor if tensor.device.type == "cpu" else tensor.to(device)
    if tensor.is_cuda and tensor.get_device() == (device.index or 0):
        return tensor
    return tensor.to(device)


def broadcast(tensor: torch.Tensor, devices: Sequence[Any] | None = None, *,
              out: Sequence[torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
    if out is not None:
        if devices is not None:
            raise RuntimeError("'devices' must not be specified when 'out' is specified")
        for destination in out:
            destination.copy_(tensor)
        return tuple(out)
    if not devices:
        raise RuntimeError("'devices' must be specified when 'out' is not")
    return tuple(_on(tensor, _target(device)) for device in devices)


def broadcast_coalesced(tensors: Sequence[torch.Tensor], devices: Sequence[Any],
                        buffer_size: int = 10485760) -> list[list[torch.Tensor]]:
    return [[_on(tensor, _target(device)) for tensor in tensors] for device in devices]


def reduce_add(inputs: Sequence[torch.Tensor], destination: Any = None) -> torch.Tensor:
    target = _target(destination)
    total = inputs[0].to(target, copy=True)
    for tensor in inputs[1:]:
        total.add_(_on(tensor, target))
    return total


def reduce_add_coalesced(inputs: Sequence[Sequence[torch.Tensor]], destination: Any = None,
                         buffer_size: int = 10485760) -> tuple[torch.Tensor, ...]:
    return tuple(reduce_add(list(per_device), destination) for per_device in zip(*inputs))


def scatter(tensor: torch.Tensor, devices: Sequence[Any] | None = None, chunk_sizes: Sequence[int] | None = None,
            dim: int = 0, streams: Any = None, *, out: Sequence[torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
    if out is not None:
        chunks = tensor.split([destination.shape[dim] for destination in out], dim)
        for chunk, destination in zip(chunks, out):
            destination.copy_(chunk)
        return tuple(out)
    if not devices:
        raise RuntimeError("'devices' must be specified when 'out' is not")
    chunks = tensor.split(list(chunk_sizes), dim) if chunk_sizes else tensor.chunk(len(devices), dim)
    return tuple(_on(chunk, _target(device)) for chunk, device in zip(chunks, devices))


def gather(tensors: Sequence[torch.Tensor], dim: int = 0, destination: Any = None, *,
           out: torch.Tensor | None = None) -> torch.Tensor:
    if out is not None:
        destination = torch.device("cpu") if out.device.type == "cpu" else backend.device(out.get_device())
        out.copy_(torch.cat([_on(tensor, destination) for tensor in tensors], dim))
        return out
    target = _target(destination)
    return torch.cat([_on(tensor, target) for tensor in tensors], dim)

