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


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8, torch.complex128], ids=str)
def test_large_uploads_travel_in_pieces_and_arrive_exact(remote, dtype):
    """Host tensors of 16 MiB and more go as several UPLOAD messages (the daemon copies one
    piece while the next is on the wire); the element count here is not a multiple of a piece."""
    import libremote
    from libremote.client import sync

    numel = (sync.PIPELINED_UPLOAD_BYTES * 2 + 4096 + 8) // torch.empty((), dtype=dtype).element_size() + 3
    generator = torch.Generator().manual_seed(7)
    host = (torch.randn(numel, generator=generator, dtype=torch.float64) * 100).to(dtype)
    expected = host.clone()
    with libremote.op_trace() as ops:
        device_tensor = host.view(-1, 1).cuda()
    host.fill_(0)  # the bytes were taken when .cuda() returned
    pieces = -(-expected.nbytes // sync.UPLOAD_PIECE_BYTES)
    assert ops.count("aten::as_strided") == pieces >= 3, ops
    assert device_tensor.shape == (numel, 1) and device_tensor.dtype == dtype
    assert torch.equal(device_tensor.cpu().view(-1), expected)
    assert torch.equal((device_tensor + device_tensor).cpu().view(-1), expected + expected)


def test_large_channels_last_upload_keeps_its_layout(remote):
    host = torch.randn(32, 64, 48, 48).to(memory_format=torch.channels_last)  # 18 MiB, not contiguous
    device_tensor = host.cuda()
    assert device_tensor.stride() == host.stride()
    assert torch.equal(device_tensor.cpu(), host)


def test_large_copy_into_a_remote_tensor_travels_in_pieces(remote):
    """``param.copy_(host)`` (load_state_dict) of a large tensor: pieces too, with the dtype
    converted on the daemon, into a destination that is a view at an offset of a larger tensor."""
    import libremote
    from libremote.client import sync

    rows = sync.PIPELINED_UPLOAD_BYTES // (1024 * 8) + 5
    host = torch.randn(rows, 1024, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    storage = torch.zeros(rows + 2, 1024, device="cuda")
    destination = storage[1:-1]
    with libremote.op_trace() as ops:
        destination.copy_(host)
    assert ops.count("aten::as_strided") >= 2, ops
    back = storage.cpu()
    assert torch.equal(back[1:-1], host.to(torch.float32))
    assert not back[0].any() and not back[-1].any()


def test_a_tensor_from_an_earlier_session_is_a_clear_error(remote, daemon):
    x = torch.ones(3, device="cuda")
    remote.connect(daemon.address)  # a new session: the daemon freed x's memory with the old one
    for use in (lambda: x * 2, lambda: torch.cat([x, x]), lambda: x.sum(dim=0, keepdim=True)):
        with pytest.raises(RuntimeError, match="belongs to an earlier session"):
            use()
    assert (torch.ones(3, device="cuda") * 2).sum().item() == 6.0  # the new session works
