"""The PyTorch features programs rely on, with ``cuda`` meaning the libremote daemon's device.

Printing, checkpoints (``torch.save``/``torch.load`` in CUDA's file format), DataLoader with
pinned memory, default devices, autocast and GradScaler, the ``torch.cuda`` and
``torch.accelerator`` APIs, deepcopy and dtype conversion of modules, and the
``LIBREMOTE_SERVER`` opt-in for unmodified scripts.
"""

from __future__ import annotations

import copy
import io
import json
import math
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from libremote.client.tensor import RemoteTensor
from libremote_wire.messages import Cmd

from conftest import REPO, subprocess_env
from helpers import run_python

RTOL = 1e-4
ATOL = 1e-5


def assert_remote(tensor: torch.Tensor) -> None:
    assert isinstance(tensor, RemoteTensor), type(tensor)
    assert tensor.is_cuda
    assert tensor.device == torch.device("cuda", 0)


def assert_host(tensor: torch.Tensor) -> None:
    assert not isinstance(tensor, RemoteTensor), type(tensor)
    assert tensor.device.type == "cpu"
    assert not tensor.is_cuda


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.BatchNorm1d(16), nn.Linear(16, 3))


# ------------------------------------------------------------------------------------------------
# Printing
# ------------------------------------------------------------------------------------------------
def test_print_and_repr_show_values_and_cuda_device(remote, capsys):
    t = torch.tensor([[1.0, 2.0], [3.5, -4.0]]).cuda()
    print(t)
    printed = capsys.readouterr().out
    assert "device='cuda:0'" in printed
    assert "3.5000" in printed and "-4.0000" in printed
    text = repr(t)
    assert text.startswith("tensor([[")
    assert "device='cuda:0'" in text
    assert str(t) == text
    # Same layout as a local tensor, apart from the device suffix.
    local = repr(torch.tensor([[1.0, 2.0], [3.5, -4.0]]))
    assert text.replace(", device='cuda:0'", "") == local


def test_repr_of_integer_and_other_dtypes(remote):
    text = repr(torch.arange(5, device="cuda"))
    assert text == "tensor([0, 1, 2, 3, 4], device='cuda:0')"
    half = repr(torch.ones(2, device="cuda", dtype=torch.float16))
    assert "dtype=torch.float16" in half and "device='cuda:0'" in half
    boolean = repr(torch.tensor([True, False], device="cuda"))
    assert "True" in boolean and "device='cuda:0'" in boolean
    scalar = repr(torch.tensor(2.5, device="cuda"))
    assert scalar == "tensor(2.5000, device='cuda:0')"


def test_repr_of_large_tensor_is_summarized(remote):
    text = repr(torch.arange(10000.0, device="cuda"))
    assert "..." in text and "device='cuda:0'" in text


def test_str_of_tensor_requiring_grad_shows_grad_fn(remote):
    leaf = torch.ones(3, device="cuda", requires_grad=True)
    assert "requires_grad=True" in str(leaf)
    result = leaf * 2 + 1
    text = str(result)
    assert "grad_fn=<AddBackward0>" in text
    assert "device='cuda:0'" in text
    assert "3." in text
    assert "grad_fn=<SumBackward0>" in str(result.sum())


# ------------------------------------------------------------------------------------------------
# torch.save / torch.load
# ------------------------------------------------------------------------------------------------
def save_to_bytes(obj) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def test_save_load_single_tensor(remote):
    host = torch.randn(4, 5)
    data = save_to_bytes(host.cuda()).getvalue()
    loaded = torch.load(io.BytesIO(data))
    assert_remote(loaded)
    assert torch.equal(loaded.cpu(), host)
    on_cuda = torch.load(io.BytesIO(data), map_location="cuda")
    assert_remote(on_cuda)
    assert torch.equal(on_cuda.cpu(), host)
    on_cpu = torch.load(io.BytesIO(data), map_location="cpu")
    assert_host(on_cpu)
    assert torch.equal(on_cpu, host)


def test_save_load_dict_of_tensors(remote, tmp_path):
    host = {"a": torch.randn(3), "b": torch.arange(6).reshape(2, 3), "c": torch.ones(2, dtype=torch.float16)}
    path = tmp_path / "tensors.pt"
    torch.save({k: v.cuda() for k, v in host.items()}, path)
    for map_location in (None, "cuda"):
        loaded = torch.load(path, map_location=map_location)
        assert loaded.keys() == host.keys()
        for key, value in host.items():
            assert_remote(loaded[key])
            assert loaded[key].dtype == value.dtype
            assert torch.equal(loaded[key].cpu(), value)
    loaded = torch.load(path, map_location="cpu")
    for key, value in host.items():
        assert_host(loaded[key])
        assert torch.equal(loaded[key], value)


def test_save_load_non_contiguous_and_requires_grad(remote):
    host = torch.randn(4, 6)
    remote_t = host.cuda().t()[1:]  # a strided view
    leaf = torch.randn(3).cuda().requires_grad_()
    loaded = torch.load(save_to_bytes({"view": remote_t, "leaf": leaf}))
    assert_remote(loaded["view"])
    assert torch.equal(loaded["view"].cpu(), host.t()[1:])
    assert loaded["leaf"].requires_grad
    assert_remote(loaded["leaf"])


def test_save_load_state_dict_into_cuda_model(remote, tmp_path):
    model = small_model().cuda()
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    state = torch.load(path)
    expected = {k: v.cpu() for k, v in model.state_dict().items()}
    assert state.keys() == expected.keys()
    for key, value in state.items():
        assert_remote(value)
        assert torch.equal(value.cpu(), expected[key])
    torch.manual_seed(123)
    other = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.BatchNorm1d(16), nn.Linear(16, 3)).cuda()
    result = other.load_state_dict(torch.load(path))
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in other.state_dict().items():
        assert_remote(value)
        assert torch.equal(value.cpu(), expected[key])
    on_cpu = torch.load(path, map_location="cpu")
    for key, value in on_cpu.items():
        assert_host(value)
        assert torch.equal(value, expected[key])


def test_cpu_checkpoint_loads_to_cuda_with_map_location(remote, tmp_path):
    model = small_model()
    path = tmp_path / "cpu.pt"
    torch.save(model.state_dict(), path)
    loaded = torch.load(path, map_location="cuda")
    for key, value in model.state_dict().items():
        assert_remote(loaded[key])
        assert torch.equal(loaded[key].cpu(), value)
    # Without map_location a CPU checkpoint stays on the CPU.
    for value in torch.load(path).values():
        assert_host(value)
    cuda_model = small_model().cuda()
    cuda_model.load_state_dict(torch.load(path, map_location="cuda"))
    x = torch.randn(5, 8)
    model.eval()
    cuda_model.eval()
    torch.testing.assert_close(cuda_model(x.cuda()).cpu(), model(x), rtol=RTOL, atol=ATOL)


def test_load_cpu_state_dict_into_cuda_model_copies(remote):
    # load_state_dict copies CPU tensors into cuda parameters (param.copy_(cpu_tensor)).
    model = small_model()
    cuda_model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.BatchNorm1d(16), nn.Linear(16, 3)).cuda()
    cuda_model.load_state_dict(model.state_dict())
    for key, value in cuda_model.state_dict().items():
        assert_remote(value)
        assert torch.equal(value.cpu(), model.state_dict()[key])


def test_save_load_whole_module(remote, tmp_path):
    model = small_model().cuda()
    count = len(list(model.parameters()))
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)
    assert isinstance(loaded, nn.Sequential)
    params = list(loaded.parameters())
    assert len(params) == count
    for param, original in zip(params, model.parameters()):
        assert isinstance(param, nn.Parameter)
        assert param.requires_grad
        assert_remote(param)
        assert torch.equal(param.detach().cpu(), original.detach().cpu())
    for buffer, original in zip(loaded.buffers(), model.buffers()):
        assert_remote(buffer)
        assert torch.equal(buffer.cpu(), original.cpu())
    x = torch.randn(4, 8)
    loaded.eval()
    model.eval()
    torch.testing.assert_close(loaded(x.cuda()).cpu(), model(x.cuda()).cpu())
    # The loaded module trains.
    loaded.train()
    loss = loaded(x.cuda()).sum()
    loss.backward()
    assert all(p.grad is not None and p.grad.is_cuda for p in loaded.parameters())
    on_cpu = torch.load(path, weights_only=False, map_location="cpu")
    assert len(list(on_cpu.parameters())) == count
    for param, original in zip(on_cpu.parameters(), model.parameters()):
        assert isinstance(param, nn.Parameter)
        assert_host(param)
        assert torch.equal(param.detach(), original.detach().cpu())


def test_saved_file_is_a_standard_cuda_checkpoint(remote, tmp_path):
    """A separate process with plain torch (no libremote) reads the file with map_location='cpu'."""
    host_tensor = torch.randn(3, 4)
    model = small_model().cuda()
    expected_state = {k: v.cpu() for k, v in model.state_dict().items()}
    tensor_path, state_path = tmp_path / "tensor.pt", tmp_path / "state.pt"
    torch.save(host_tensor.cuda(), tensor_path)
    torch.save(model.state_dict(), state_path)
    # The storages are recorded with CUDA's location tag.
    with zipfile.ZipFile(state_path) as archive:
        pickle_name = next(name for name in archive.namelist() if name.endswith("data.pkl"))
        assert b"cuda:0" in archive.read(pickle_name)
    result = run_python("load_a_checkpoint_with_plain_torch.py", str(tensor_path), str(state_path), timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["type"] == "Tensor"
    assert out["device"] == "cpu"
    assert torch.equal(torch.tensor(out["tensor"]), host_tensor)
    assert out["state"].keys() == expected_state.keys()
    for key, (dtype, values) in out["state"].items():
        assert dtype == str(expected_state[key].dtype)
        assert torch.equal(torch.tensor(values, dtype=expected_state[key].dtype), expected_state[key])


# ------------------------------------------------------------------------------------------------
# DataLoader
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_pin_memory_non_blocking(remote, num_workers):
    features = torch.randn(40, 6)
    labels = torch.arange(40)
    dataset = torch.utils.data.TensorDataset(features, labels)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, pin_memory=True, num_workers=num_workers)
    seen = []
    total = torch.zeros((), device="cuda")
    for x, y in loader:
        x, y = x.cuda(non_blocking=True), y.cuda(non_blocking=True)
        assert_remote(x)
        assert_remote(y)
        total = total + x.sum()
        seen.append(y.cpu())
    assert torch.equal(torch.cat(seen), labels)
    assert total.item() == pytest.approx(features.sum().item(), rel=1e-5, abs=1e-4)


def test_dataloader_to_device_non_blocking_training(remote):
    dataset = torch.utils.data.TensorDataset(torch.randn(32, 8), torch.randint(0, 3, (32,)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=False, pin_memory=True)
    model = small_model().cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in loader:
        x, y = x.to("cuda", non_blocking=True), y.to("cuda", non_blocking=True)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert math.isfinite(loss.item())


def test_pin_memory_is_harmless(remote):
    host = torch.randn(5)
    pinned = host.pin_memory()
    assert torch.equal(pinned, host)
    assert torch.equal(pinned.cuda(non_blocking=True).cpu(), host)


# ------------------------------------------------------------------------------------------------
# Default device
# ------------------------------------------------------------------------------------------------
def test_set_default_device_cuda(remote):
    try:
        torch.set_default_device("cuda")
        t = torch.randn(3)
        assert_remote(t)
        assert_remote(torch.zeros(2, 2))
        assert_remote(torch.arange(4))
        assert torch.get_default_device() == torch.device("cuda", 0)
        layer = nn.Linear(4, 4)
        for param in layer.parameters():
            assert_remote(param)
        out = layer(torch.ones(2, 4))
        assert_remote(out)
        assert out.shape == (2, 4)
    finally:
        torch.set_default_device(None)
    assert_host(torch.randn(3))
    assert torch.get_default_device() == torch.device("cpu")


def test_set_default_device_restore_with_cpu(remote):
    try:
        torch.set_default_device("cuda:0")
        assert_remote(torch.ones(2))
    finally:
        torch.set_default_device("cpu")
    assert_host(torch.ones(2))
    torch.set_default_device(None)


def test_device_context_manager(remote):
    with torch.device("cuda"):
        t = torch.randn(3)
        layer = nn.Linear(4, 2)
        assert_remote(t)
        for param in layer.parameters():
            assert_remote(param)
        assert_remote(layer(torch.ones(1, 4)))
    assert_host(torch.randn(3))
    assert_host(nn.Linear(2, 2).weight)


# ------------------------------------------------------------------------------------------------
# Autocast and GradScaler
# ------------------------------------------------------------------------------------------------
def test_autocast_bfloat16_dtypes(remote):
    a, b = torch.randn(8, 8, device="cuda"), torch.randn(8, 8, device="cuda")
    layer = nn.Linear(8, 4).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.is_autocast_enabled("cuda")
        mm = a @ b
        assert mm.dtype == torch.bfloat16
        assert_remote(mm)
        linear_out = layer(a)
        assert linear_out.dtype == torch.bfloat16
        soft = torch.softmax(mm, dim=-1)
        assert soft.dtype == torch.float32
        # Elementwise ops keep their input dtype.
        assert (a + 1).dtype == torch.float32
        with torch.autocast("cuda", enabled=False):
            assert not torch.is_autocast_enabled("cuda")
            assert (a @ b).dtype == torch.float32
        assert (a @ b).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cuda")
    assert (a @ b).dtype == torch.float32
    # Values agree with a local float32 matmul at bfloat16 accuracy.
    torch.testing.assert_close(mm.float().cpu(), a.cpu() @ b.cpu(), rtol=5e-2, atol=1e-1)


def test_autocast_float16_matmul(remote):
    a, b = torch.randn(4, 8, device="cuda"), torch.randn(8, 3, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        out = torch.mm(a, b)
        assert out.dtype == torch.float16
        assert torch.matmul(a, b).dtype == torch.float16
        assert nn.functional.linear(a, b.t()).dtype == torch.float16
        assert torch.get_autocast_dtype("cuda") == torch.float16
    torch.testing.assert_close(out.float().cpu(), a.cpu() @ b.cpu(), rtol=1e-2, atol=1e-2)


def test_autocast_decorator_style_and_cpu_tensors_untouched(remote):
    @torch.autocast("cuda", dtype=torch.bfloat16)
    def f(x, w):
        return x @ w

    x = torch.randn(3, 3)
    assert f(x.cuda(), x.cuda()).dtype == torch.bfloat16
    # CPU tensors are not cast by a cuda autocast region.
    assert f(x, x).dtype == torch.float32


def test_autocast_training_matches_local_cpu_autocast(remote):
    generator = torch.Generator().manual_seed(4)
    batches = [(torch.randn(16, 8, generator=generator), torch.randint(0, 3, (16,), generator=generator)) for _ in range(5)]

    def run(device: str) -> list[float]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3)).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with torch.autocast(device, dtype=torch.bfloat16):
                logits = model(x)
                assert logits.dtype == torch.bfloat16
                loss = nn.functional.cross_entropy(logits, y)
                assert loss.dtype == torch.float32
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            for p in model.parameters():
                assert p.dtype == torch.float32 and p.grad.dtype == torch.float32
            losses.append(loss.item())
        return losses

    remote_losses = run("cuda")
    local_losses = run("cpu")
    assert remote_losses == pytest.approx(local_losses, rel=2e-2, abs=2e-2)


def test_grad_scaler_float16_training(remote):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3)).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cuda")
    assert scaler.is_enabled()
    generator = torch.Generator().manual_seed(5)
    losses = []
    for _ in range(6):
        x = torch.randn(16, 8, generator=generator).cuda()
        y = torch.randint(0, 3, (16,), generator=generator).cuda()
        optimizer.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            logits = model(x)
            assert logits.dtype == torch.float16
            loss = nn.functional.cross_entropy(logits, y)
        scaled = scaler.scale(loss)
        assert_remote(scaled)
        scaled.backward()
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    scale = scaler.get_scale()
    assert isinstance(scale, float)
    assert scale > 0
    assert losses[-1] < losses[0]
    state = scaler.state_dict()
    assert isinstance(state["scale"], float)


def test_grad_scaler_skips_step_on_inf(remote):
    model = nn.Linear(2, 1).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda", init_scale=1024.0)
    before = model.weight.detach().cpu().clone()
    loss = (model(torch.ones(1, 2, device="cuda")) * float("inf")).sum()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(model.weight.detach().cpu(), before)  # the step was skipped
    assert scaler.get_scale() == 512.0  # backoff_factor 0.5


# ------------------------------------------------------------------------------------------------
# torch.cuda
# ------------------------------------------------------------------------------------------------
def test_cuda_device_queries(remote):
    assert torch.cuda.is_available()
    assert torch.cuda.device_count() == 1
    assert torch.cuda.current_device() == 0
    torch.cuda.set_device(0)
    assert torch.cuda.current_device() == 0
    torch.cuda.synchronize()
    torch.cuda.synchronize(0)
    name = torch.cuda.get_device_name()
    assert isinstance(name, str) and name
    assert torch.cuda.get_device_name(0) == name
    props = torch.cuda.get_device_properties(0)
    assert props.total_memory > 0
    assert isinstance(props.name, str) and props.name
    assert isinstance(props.major, int) and isinstance(props.minor, int)
    assert torch.cuda.get_device_properties("cuda:0").total_memory == props.total_memory
    assert isinstance(torch.cuda.get_device_capability(), tuple)
    assert torch.cuda.is_initialized()


def test_cuda_manual_seed(remote):
    torch.cuda.manual_seed(1234)
    a = torch.randn(6, device="cuda").cpu()
    torch.cuda.manual_seed(1234)
    b = torch.randn(6, device="cuda").cpu()
    assert torch.equal(a, b)
    torch.cuda.manual_seed_all(99)
    c = torch.rand(6, device="cuda").cpu()
    torch.cuda.manual_seed_all(99)
    d = torch.rand(6, device="cuda").cpu()
    assert torch.equal(c, d)
    torch.manual_seed(7)  # seeds cuda too
    e = torch.randn(4, device="cuda").cpu()
    torch.manual_seed(7)
    f = torch.randn(4, device="cuda").cpu()
    assert torch.equal(e, f)
    assert not torch.equal(a[:4], e) or not torch.equal(c[:4], e)


def test_cuda_rng_state_round_trip(remote):
    torch.cuda.manual_seed(5)
    state = torch.cuda.get_rng_state()
    assert isinstance(state, torch.Tensor)
    assert state.dtype == torch.uint8
    assert_host(state)
    first = torch.randn(8, device="cuda").cpu()
    second = torch.randn(8, device="cuda").cpu()
    assert not torch.equal(first, second)
    torch.cuda.set_rng_state(state)
    assert torch.equal(torch.randn(8, device="cuda").cpu(), first)
    # dropout uses the same generator
    torch.cuda.set_rng_state(state)
    mask1 = nn.functional.dropout(torch.ones(100, device="cuda"), 0.5).cpu()
    torch.cuda.set_rng_state(state)
    mask2 = nn.functional.dropout(torch.ones(100, device="cuda"), 0.5).cpu()
    assert torch.equal(mask1, mask2)
    states = torch.cuda.get_rng_state_all()
    assert len(states) == 1
    torch.cuda.set_rng_state_all(states)


def test_cuda_memory_accounting(remote):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    assert before >= 0
    mib = 1 << 20
    t = torch.ones(mib // 4, device="cuda", dtype=torch.float32)
    allocated = torch.cuda.memory_allocated()
    assert allocated - before >= mib
    assert torch.cuda.max_memory_allocated() >= allocated
    assert torch.cuda.memory_reserved() >= 0
    assert torch.cuda.max_memory_allocated() >= torch.cuda.memory_allocated()
    assert t.sum().item() == mib // 4
    del t
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated()
    assert after <= allocated - mib
    torch.cuda.empty_cache()
    stats = torch.cuda.memory_stats()
    assert isinstance(stats, dict)
    free, total = torch.cuda.mem_get_info()
    assert total > 0 and 0 <= free <= total
    torch.cuda.reset_peak_memory_stats()
    assert torch.cuda.max_memory_allocated() >= torch.cuda.memory_allocated()


def test_cuda_memory_stats_have_cudas_keys_and_count_storages_by_pool(remote):
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()
    small = torch.ones(1024, device="cuda")  # 4 KiB: CUDA's small pool
    large = torch.ones(1 << 20, device="cuda")  # 4 MiB: its large pool
    view = large[10:20]  # a view is no new allocation
    stats = torch.cuda.memory_stats()
    for pool, grown in (("small_pool", 4096), ("large_pool", 4 << 20), ("all", 4096 + (4 << 20))):
        assert stats[f"allocated_bytes.{pool}.current"] - before[f"allocated_bytes.{pool}.current"] == grown, pool
        assert stats[f"allocated_bytes.{pool}.allocated"] - before[f"allocated_bytes.{pool}.allocated"] == grown, pool
        assert stats[f"allocation.{pool}.current"] - before[f"allocation.{pool}.current"] == (2 if pool == "all" else 1)
        assert stats[f"allocated_bytes.{pool}.peak"] >= stats[f"allocated_bytes.{pool}.current"]
    assert stats["allocated_bytes.all.current"] == torch.cuda.memory_allocated()
    assert stats["allocated_bytes.all.peak"] == torch.cuda.max_memory_allocated()
    del small, large, view
    after = torch.cuda.memory_stats()
    assert after["allocated_bytes.all.current"] == before["allocated_bytes.all.current"]
    assert after["allocated_bytes.large_pool.freed"] - before["allocated_bytes.large_pool.freed"] == 4 << 20
    assert after["allocation.all.freed"] - before["allocation.all.freed"] == 2
    # The standard report reads every key (it raised KeyError on a partial dict).
    summary = torch.cuda.memory_summary()
    assert "Allocated memory" in summary and "from small pool" in summary
    assert "Allocated memory" in torch.cuda.memory_summary(abbreviated=True)


def test_set_per_process_memory_fraction_caps_the_session(remote):
    torch.cuda.synchronize()
    _, total = torch.cuda.mem_get_info()
    fraction = (torch.cuda.memory_allocated() + (12 << 20)) / total  # 12 MiB of room
    try:
        torch.cuda.set_per_process_memory_fraction(fraction)
        fits = torch.ones(1 << 20, device="cuda")  # 4 MiB
        assert fits.sum().item() == 1 << 20
        with pytest.raises(torch.OutOfMemoryError, match="set_per_process_memory_fraction"):
            torch.ones(4 << 20, device="cuda").sum().item()  # 16 MiB
        assert (fits * 2).sum().item() == 2 << 20  # the session goes on
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert torch.ones(4 << 20, device="cuda").sum().item() == 4 << 20
    with pytest.raises(ValueError, match="0~1"):
        torch.cuda.set_per_process_memory_fraction(1.5)


def _daemon_settings() -> dict:
    from libremote.client import runtime

    result, _ = runtime.current().request([Cmd.QUERY, "settings"])
    return result


def test_numerics_switches_reach_the_daemon_per_session(remote, raw):  # noqa: F811
    # TF32 matmuls, cuDNN autotuning and deterministic algorithms are switches of the process
    # that runs the kernels: the daemon sets each session's own around its work.
    defaults = _daemon_settings()
    assert defaults["float32_matmul_precision"] == torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.benchmark = True
        torch.use_deterministic_algorithms(True, warn_only=True)
        x = torch.randn(8, 8, device="cuda")
        assert torch.allclose((x @ x).cpu(), x.cpu() @ x.cpu(), atol=1e-4)
        applied = _daemon_settings()
        assert applied["float32_matmul_precision"] == "high"
        assert applied["cudnn_benchmark"] is True
        assert applied["deterministic_algorithms"] == "warn"
        # Another session (a raw client: it never sends SETTINGS) runs under the defaults meanwhile.
        results, error, _ = raw.call([[Cmd.QUERY, "settings"]])
        assert error is None and results[0] == defaults, (results, error)
        assert _daemon_settings()["float32_matmul_precision"] == "high"  # and back for this one
    finally:
        torch.set_float32_matmul_precision(defaults["float32_matmul_precision"])
        torch.backends.cudnn.benchmark = defaults["cudnn_benchmark"]
        torch.use_deterministic_algorithms(False)
    assert _daemon_settings() == defaults


def test_unknown_or_bad_settings_are_refused(raw):  # noqa: F811
    for bad in ({"float32_matmul_precision": "fastest"}, {"cudnn_benchmark": 1}, {"os.system": "ls"}):
        results, error, _ = raw.call([[Cmd.SETTINGS, bad], [Cmd.QUERY, "settings"]])
        assert error is not None and error[0] == "refused", (bad, error)
        assert results[0]["float32_matmul_precision"] != "fastest"


def test_legacy_tensor_types_name_build_and_cast_cuda_tensors(remote):
    x = torch.arange(4.0, device="cuda")
    assert x.type() == "torch.cuda.FloatTensor"
    assert torch.arange(3, device="cuda").type() == "torch.cuda.LongTensor"
    assert isinstance(x, torch.cuda.FloatTensor) and not isinstance(x, torch.cuda.LongTensor)
    assert not isinstance(torch.ones(2), torch.cuda.FloatTensor)
    half = x.type(torch.cuda.HalfTensor)
    assert half.is_cuda and half.dtype == torch.float16 and half.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert x.type("torch.cuda.DoubleTensor").dtype == torch.float64
    host = x.type(torch.DoubleTensor)
    assert host.device.type == "cpu" and host.dtype == torch.float64 and host.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert x.type(torch.cuda.FloatTensor) is x  # already that type: no copy, as torch
    moved = torch.ones(3).type(torch.cuda.LongTensor)
    assert moved.is_cuda and moved.dtype == torch.int64 and moved.tolist() == [1, 1, 1]
    built = torch.cuda.LongTensor([1, 2, 3])
    assert built.is_cuda and built.dtype == torch.int64 and built.tolist() == [1, 2, 3]
    sized = torch.cuda.FloatTensor(2, 3)
    assert sized.is_cuda and sized.shape == (2, 3) and sized.dtype == torch.float32


def test_a_scalar_tensor_takes_a_number_format(remote):
    loss = torch.tensor(0.123456, device="cuda")
    assert f"{loss:.3f}" == "0.123"  # logging lines: f"loss {loss:.4f}"
    assert f"{loss * 10:>8.2f}" == "    1.23"
    with pytest.raises(TypeError):
        f"{torch.ones(2, device='cuda'):.2f}"  # as torch: only a 0-dim tensor formats as a number


def test_nvtx_ranges_are_accepted(remote):
    # Profiled programs annotate with NVTX; a CPU build of torch raises instead (nothing to annotate).
    assert torch.cuda.nvtx.range_push("outer") == 0
    assert torch.cuda.nvtx.range_push("inner") == 1
    assert torch.cuda.nvtx.range_pop() == 1
    assert torch.cuda.nvtx.range_pop() == 0
    torch.cuda.nvtx.mark("here")
    handle = torch.cuda.nvtx.range_start("across threads")
    torch.cuda.nvtx.range_end(handle)
    with torch.cuda.nvtx.range("step {}", 3):
        x = torch.ones(3, device="cuda") * 2
    assert x.sum().item() == 6.0


def test_cuda_stream_context(remote):
    s = torch.cuda.Stream()
    x = torch.arange(6.0, device="cuda")
    with torch.cuda.stream(s):
        y = x * 2 + 1
    torch.cuda.current_stream().wait_stream(s)
    s.synchronize()
    assert torch.equal(y.cpu(), torch.arange(6.0) * 2 + 1)
    with s:
        z = y - 1
    assert torch.equal(z.cpu(), torch.arange(6.0) * 2)
    assert s.query()
    assert isinstance(torch.cuda.current_stream(), torch.cuda.Stream)
    assert torch.cuda.default_stream() is not None


def test_cuda_event_timing(remote):
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    a = torch.randn(128, 128, device="cuda")
    for _ in range(5):
        a = a @ a / 128
    end.record()
    end.synchronize()
    elapsed = start.elapsed_time(end)
    assert isinstance(elapsed, float)
    assert elapsed >= 0.0
    assert end.query()
    stream_event = torch.cuda.current_stream().record_event()
    stream_event.synchronize()


# ------------------------------------------------------------------------------------------------
# torch.accelerator
# ------------------------------------------------------------------------------------------------
def test_torch_accelerator(remote):
    accelerator = torch.accelerator.current_accelerator()
    assert isinstance(accelerator, torch.device)
    assert accelerator.type == "cuda"
    assert torch.accelerator.is_available()
    assert torch.accelerator.device_count() == 1
    assert torch.accelerator.current_device_index() == 0
    torch.accelerator.synchronize()
    t = torch.ones(3, device=accelerator)
    assert_remote(t)


# ------------------------------------------------------------------------------------------------
# Modules: deepcopy, dtype conversion
# ------------------------------------------------------------------------------------------------
def test_deepcopy_cuda_module_is_independent(remote):
    model = small_model().cuda()
    clone = copy.deepcopy(model)
    for (name, original), (clone_name, copied) in zip(model.named_parameters(), clone.named_parameters()):
        assert name == clone_name
        assert isinstance(copied, nn.Parameter)
        assert copied.requires_grad
        assert_remote(copied)
        assert copied is not original
        assert torch.equal(copied.detach().cpu(), original.detach().cpu())
    for buffer in clone.buffers():
        assert_remote(buffer)
    before = model[0].weight.detach().cpu().clone()
    with torch.no_grad():
        clone[0].weight.add_(1.0)
        clone[0].bias.zero_()
    assert torch.equal(model[0].weight.detach().cpu(), before)
    assert torch.equal(clone[0].weight.detach().cpu(), before + 1.0)
    assert model[0].bias.detach().abs().sum().item() > 0
    # And the other way round.
    with torch.no_grad():
        model[3].weight.mul_(0)
    assert clone[3].weight.detach().abs().sum().item() > 0


def test_deepcopy_tensor(remote):
    t = torch.randn(4).cuda()
    c = copy.deepcopy(t)
    assert_remote(c)
    assert torch.equal(c.cpu(), t.cpu())
    c.add_(1)
    assert not torch.equal(c.cpu(), t.cpu())


def test_module_half_forward_matches_local(remote):
    torch.manual_seed(0)
    local = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    cuda_model = copy.deepcopy(local).cuda()
    cuda_param_objects = [id(p) for p in cuda_model.parameters()]
    local.half()
    returned = cuda_model.half()
    assert returned is cuda_model
    for param in cuda_model.parameters():
        assert isinstance(param, nn.Parameter)
        assert param.dtype == torch.float16
        assert_remote(param)
    # .data rebinding keeps the same Parameter objects (optimizers holding them stay valid).
    assert [id(p) for p in cuda_model.parameters()] == cuda_param_objects
    x = torch.randn(5, 8).half()
    out = cuda_model(x.cuda())
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.cpu(), local(x), rtol=1e-3, atol=1e-3)


def test_module_to_float64_forward_matches_local(remote):
    torch.manual_seed(0)
    local = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    cuda_model = copy.deepcopy(local).cuda()
    local.to(torch.float64)
    cuda_model.to(torch.float64)
    for param in cuda_model.parameters():
        assert isinstance(param, nn.Parameter)
        assert param.dtype == torch.float64
        assert_remote(param)
    x = torch.randn(5, 8, dtype=torch.float64)
    out = cuda_model(x.cuda())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.cpu(), local(x))
    # Gradients flow through the converted parameters.
    out.sum().backward()
    local(x).sum().backward()
    for remote_param, local_param in zip(cuda_model.parameters(), local.parameters()):
        assert remote_param.grad.dtype == torch.float64
        torch.testing.assert_close(remote_param.grad.cpu(), local_param.grad)


def test_module_to_cuda_with_dtype_and_back_to_cpu(remote):
    torch.manual_seed(0)
    local = nn.Linear(3, 2)
    moved = copy.deepcopy(local).to("cuda", torch.float64)
    assert moved.weight.dtype == torch.float64
    assert_remote(moved.weight)
    back = moved.cpu().float()
    assert_host(back.weight)
    assert isinstance(back.weight, nn.Parameter)
    assert torch.equal(back.weight.detach(), local.weight.detach())


def test_param_data_assignment(remote):
    layer = nn.Linear(3, 3).cuda()
    param = layer.weight
    param.data = torch.zeros(3, 3, device="cuda")
    assert layer.weight is param
    assert_remote(layer.weight)
    assert torch.equal(layer.weight.detach().cpu(), torch.zeros(3, 3))
    param.data = torch.ones(2, 3).cuda()
    assert layer.weight.shape == (2, 3)
    assert torch.equal(layer.weight.detach().cpu(), torch.ones(2, 3))


# ------------------------------------------------------------------------------------------------
# LIBREMOTE_SERVER opt-in (needs the package installed non-editable: the .pth startup hook)
# ------------------------------------------------------------------------------------------------
def _startup_hook_installed() -> bool:
    import site
    import sysconfig

    paths = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
    return any(Path(p, "libremote-autostart.pth").is_file() for p in paths)


def test_startup_hook_is_installed():
    assert _startup_hook_installed(), "run `pip install --no-deps --force-reinstall .` (scripts/bootstrap.sh does)"


def test_unmodified_script_uses_remote_gpu(daemon):
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "unmodified_train.py")],
        env=subprocess_env(LIBREMOTE_SERVER=daemon.address),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("device: cuda"), result.stdout
    losses = [float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("step ")]
    assert len(losses) == 5, result.stdout
    assert all(math.isfinite(v) for v in losses)
    # The same script run locally on the CPU (no daemon) gives the same losses.
    local = subprocess.run(
        [sys.executable, str(REPO / "examples" / "unmodified_train.py")],
        env=subprocess_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert local.returncode == 0, local.stderr
    assert local.stdout.splitlines()[0].startswith("device: cpu")
    local_losses = [float(line.rsplit(" ", 1)[1]) for line in local.stdout.splitlines() if line.startswith("step ")]
    assert losses == pytest.approx(local_losses, abs=2e-4)


def test_without_env_var_libremote_is_not_imported():
    result = run_python("import sys, torch; print('libremote' in sys.modules)", timeout=300, fresh=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_startup_hook_does_not_import_torch_eagerly(daemon):
    result = run_python("import sys; print('torch' in sys.modules)", timeout=300, fresh=True,
                        LIBREMOTE_SERVER=daemon.address)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_env_var_activates_on_import_torch(daemon):
    result = run_python("use_cuda_after_import_torch.py", timeout=300, fresh=True, LIBREMOTE_SERVER=daemon.address)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["True", "True 1", "cuda:0 12.0"]
