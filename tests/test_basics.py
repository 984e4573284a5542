"""The thin slice: tensors go to the daemon, ops run there, results come back exactly."""

from __future__ import annotations

import pytest
import torch


def test_round_trip_is_exact(remote):
    host = torch.randn(5, 7)
    device_tensor = host.cuda()
    assert device_tensor.is_cuda
    assert device_tensor.device == torch.device("cuda", 0)
    back = device_tensor.cpu()
    assert back.device.type == "cpu"
    assert torch.equal(back, host)


def test_elementwise_chain_matches_local(remote):
    a, b = torch.randn(64, 32), torch.randn(64, 32)
    expected = torch.tanh(a * 2 + b).exp() - b.abs().sqrt()
    got = torch.tanh(a.cuda() * 2 + b.cuda()).exp() - b.cuda().abs().sqrt()
    torch.testing.assert_close(got.cpu(), expected)


def test_item_and_python_scalars(remote):
    x = torch.arange(10.0, device="cuda")
    assert x.sum().item() == 45.0
    assert float(x[3]) == 3.0
    assert int(x.max()) == 9
    assert bool((x > 8).any()) is True
    assert x.tolist() == [float(v) for v in range(10)]


def test_repr_shows_cuda_device(remote):
    x = torch.tensor([1.0, 2.5], device="cuda")
    text = repr(x)
    assert text.startswith("tensor([1.0000, 2.5000]")
    assert "device='cuda:0'" in text
    y = torch.ones(2, device="cuda", requires_grad=True) * 3
    assert "grad_fn=<MulBackward0>" in repr(y)


def test_numpy_raises_like_cuda(remote):
    x = torch.ones(3, device="cuda")
    with pytest.raises(TypeError, match="can't convert cuda:0 device type tensor to numpy"):
        x.numpy()
    assert x.cpu().numpy().tolist() == [1.0, 1.0, 1.0]


def test_shape_errors_raise_locally_on_the_calling_line(remote):
    a = torch.ones(3, device="cuda")
    b = torch.ones(4, device="cuda")
    with pytest.raises(RuntimeError, match="must match the size|broadcast"):
        a + b
    # The session is still fine afterwards.
    assert (a + 1).sum().item() == 6.0


def test_uploading_leaves_the_host_tensor_resizable(remote):
    host = torch.arange(200_000, dtype=torch.float32)  # large enough to travel zero-copy
    device_tensor = host.cuda()
    host.resize_(10)  # would fail if the upload had pinned the host storage's size
    assert host.tolist() == list(range(10))
    assert device_tensor.cpu()[:10].tolist() == list(range(10))
    fetched = device_tensor.cpu()
    fetched.resize_(5)
    assert fetched.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
