"""Pinned host memory as programs see it on CUDA (libremote/client/device_map.py, _pin_memory).

A CPU build of torch cannot pin; libremote marks the storage of the tensors a program pins, so
``is_pinned()`` answers as on CUDA and ``pin_memory()`` returns a copy as CUDA's does.
"""

from __future__ import annotations

import pytest
import torch


def test_pin_memory_returns_a_pinned_copy(remote):
    host = torch.randn(4, 3)
    pinned = host.pin_memory()
    assert pinned is not host
    assert not host.is_pinned()
    assert pinned.is_pinned()
    assert pinned[1:].is_pinned() and pinned.t().is_pinned()  # views share the pinned storage
    assert pinned.pin_memory() is pinned  # already pinned: the tensor itself, as on CUDA
    assert torch.equal(pinned, host)
    assert pinned.untyped_storage().data_ptr() != host.untyped_storage().data_ptr()
    host.add_(1.0)
    assert not torch.equal(pinned, host)  # a copy, not an alias


def test_pin_memory_keeps_strides(remote):
    transposed = torch.randn(3, 5).t()
    pinned = transposed.pin_memory()
    assert pinned.stride() == transposed.stride()
    assert torch.equal(pinned, transposed) and pinned.is_pinned()


@pytest.mark.parametrize("factory", [
    lambda: torch.empty(3, pin_memory=True),
    lambda: torch.zeros(2, 2, pin_memory=True),
    lambda: torch.tensor([1, 2, 3], pin_memory=True),
    lambda: torch.empty_strided((2, 3), (1, 2), pin_memory=True),
])
def test_factories_with_pin_memory_make_pinned_tensors(remote, factory):
    tensor = factory()
    assert tensor.device.type == "cpu"
    assert tensor.is_pinned()
    assert not torch.empty(3).is_pinned()


def test_device_tensors_are_not_pinned_and_cannot_be(remote):
    pinned = torch.arange(6.0).pin_memory()
    device = pinned.cuda(non_blocking=True)
    assert torch.equal(device.cpu(), pinned)
    assert not device.is_pinned()
    with pytest.raises(RuntimeError, match=r"cannot pin 'torch.cuda.FloatTensor' only dense CPU tensors can be pinned"):
        device.pin_memory()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_pin_memory_batches_are_pinned(remote, num_workers):
    dataset = torch.utils.data.TensorDataset(torch.randn(12, 3), torch.arange(12))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, pin_memory=True, num_workers=num_workers)
    seen = []
    for features, labels in loader:
        assert features.is_pinned() and labels.is_pinned()
        seen.append(labels.cuda(non_blocking=True).cpu())
    assert torch.equal(torch.cat(seen), torch.arange(12))
    unpinned = torch.utils.data.DataLoader(dataset, batch_size=4)
    assert not next(iter(unpinned))[0].is_pinned()
