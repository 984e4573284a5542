"""Checks that need a daemon on a real CUDA device (skipped on machines without one).

The daemon runs with ``--device cuda``; this process stays a client (its own torch.cuda is the
libremote facade), so CUDA availability is probed in a fresh interpreter.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import Daemon, client_connected_to, subprocess_env
from helpers import cuda_on_this_machine, program

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not cuda_on_this_machine(), reason="needs a CUDA device for the daemon"),
]


@pytest.fixture(scope="module")
def gpu_remote():
    server = Daemon(device="cuda")
    try:
        with client_connected_to(server.address) as libremote:
            yield libremote
    finally:
        server.stop()


def test_device_facts_are_the_gpus(gpu_remote):
    props = torch.cuda.get_device_properties(0)
    assert props.total_memory > 1 << 30
    assert props.major >= 7
    assert "CPU backend" not in torch.cuda.get_device_name()


def test_matmul_and_training_step_match_cpu(gpu_remote):
    torch.manual_seed(0)
    a, b = torch.randn(256, 128), torch.randn(128, 64)
    torch.testing.assert_close((a.cuda() @ b.cuda()).cpu(), a @ b, rtol=1e-4, atol=1e-4)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    remote_model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    remote_model.load_state_dict(model.state_dict())
    remote_model.cuda()
    x, y = torch.randn(16, 32), torch.randn(16, 1)
    for net, data, target in ((model, x, y), (remote_model, x.cuda(), y.cuda())):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        for _ in range(3):
            loss = torch.nn.functional.mse_loss(net(data), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for p_local, p_remote in zip(model.parameters(), remote_model.parameters()):
        torch.testing.assert_close(p_remote.cpu(), p_local.detach(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_attention_on_gpu(gpu_remote, dtype):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 32) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    qc, kc, vc = (t.to("cuda", dtype).requires_grad_() for t in (q, k, v))
    with gpu_remote.op_trace() as ops:
        out = torch.nn.functional.scaled_dot_product_attention(qc, kc, vc, is_causal=True)
        out.float().sum().backward()
    tolerance = 2e-2 if dtype is torch.bfloat16 else 1e-4
    torch.testing.assert_close(out.float().cpu(), expected, rtol=tolerance, atol=tolerance)
    assert "aten::_scaled_dot_product_fused_attention_overrideable" in ops
    assert qc.grad is not None and torch.isfinite(qc.grad.float().cpu()).all()


def test_fused_attention_with_dropout_is_seeded_and_differentiable(gpu_remote):
    # The efficient kernel's dropout seed and offset live on the device between forward and
    # backward (server/translations.py); the backward must read the same mask the forward drew.
    def step(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.cuda.manual_seed(seed)
        q, k, v = (torch.ones(2, 4, 64, 32, device="cuda").requires_grad_() for _ in range(3))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
        out.sum().backward()
        return out.detach().cpu(), v.grad.cpu()

    out, grad = step(1)
    again, grad_again = step(1)
    assert torch.equal(out, again) and torch.equal(grad, grad_again)
    # With values all ones, each output element is the sum of the kept weights scaled by 1/(1-p)
    # (exactly 1 without dropout);
    # v's gradient is the same mask summed the other way: both totals are the kept mass.
    assert not torch.allclose(out, torch.ones_like(out)), "dropout drew no mask"
    torch.testing.assert_close(out.sum(), grad.sum(), rtol=1e-4, atol=1e-3)


def test_autocast_bf16_on_gpu(gpu_remote):
    x = torch.randn(8, 16, device="cuda")
    w = torch.randn(16, 4, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert (x @ w).dtype == torch.bfloat16


def test_memory_figures_track_allocations(gpu_remote):
    before = torch.cuda.memory_allocated()
    block = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    assert torch.cuda.memory_allocated() - before >= 64 << 20
    del block
    assert torch.cuda.memory_allocated() - before < 64 << 20


def test_real_out_of_memory_spills_and_retries(tmp_path):
    """A device budget far above the card: only the GPU allocator's own out-of-memory error can
    trigger spilling, and the daemon must spill and retry rather than fail the op."""
    import json

    server = Daemon("--device-memory", "1TiB", "--host-spill", "32GiB", "--memory-quota", "1TiB", device="cuda")
    try:
        out = subprocess.run([sys.executable, program("gpu_hold_more_than_the_card.py")], capture_output=True, text=True,
                             env=subprocess_env() | {"TEST_SERVER": server.address}, timeout=600)
        assert out.returncode == 0, out.stderr + server.log()
        report = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        server.stop()
    assert all(report["intact"]), report["intact"]
    assert report["device"]["evictions"] > 0 and report["device"]["bytes_evicted"] >= 8 << 30


def test_prefetch_on_the_side_stream_is_exact(tmp_path):
    """Prefetched bytes are used only after their copy on the side stream: the same program gives
    the same results with a device budget that forces spills and prefetches, and with none."""
    import json

    reports = {}
    for name, flags in (("budget", ("--device-memory", "200MiB", "--host-spill", "16GiB")), ("free", ())):
        server = Daemon(*flags, device="cuda")
        try:
            out = subprocess.run([sys.executable, program("gpu_prefetch_and_train_through_spills.py")], capture_output=True,
                                 text=True, timeout=600,
                                 env=subprocess_env() | {"TEST_SERVER": server.address, "LIBREMOTE_BATCH": "1024",
                                                         "PARAMS_OUT": str(tmp_path / f"{name}.pt")})
            assert out.returncode == 0, out.stderr + server.log()
            reports[name] = json.loads(out.stdout.strip().splitlines()[-1])
        finally:
            server.stop()
    assert reports["budget"]["total"] == reports["free"]["total"], reports
    assert abs(reports["free"]["total"] - (5.0 * 16 * (1 << 20) + 4 * 200)) < 1e-6 * reports["free"]["total"]
    assert reports["budget"]["device"]["prefetches"] > 0, reports["budget"]
    for got, expected in zip(torch.load(tmp_path / "budget.pt"), torch.load(tmp_path / "free.pt")):
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
