"""Whole-step capture (``libremote.capture_step``): a training step recorded once and replayed by
the daemon with one command per step. Parity with local eager torch, and the contract's errors."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

import libremote
from libremote_wire.messages import Cmd

from conftest import client_connected_to
from helpers import pool_daemon

F = nn.functional


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 3))


def _batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 12, generator=generator), torch.randint(0, 3, (6,), generator=generator))
            for _ in range(count)]


@pytest.mark.parametrize("optimizer_name,compiled", [("sgd", False), ("adam", False), ("adam", True)])
def test_replayed_steps_match_local_eager(remote, optimizer_name, compiled):
    local = _model()
    model = copy.deepcopy(local).cuda()
    if optimizer_name == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        local_optimizer = torch.optim.SGD(local.parameters(), lr=0.05, momentum=0.9)
    else:  # the step count must live on the device to be replayed, as for CUDA graphs
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01, capturable=True)
        local_optimizer = torch.optim.Adam(local.parameters(), lr=0.01)
    forward = torch.compile(model) if compiled else model

    def train_step(x, y):
        loss = F.cross_entropy(forward(x), y)
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        optimizer.step()
        return loss.detach()

    batches = _batches(6)
    step = libremote.capture_step(train_step, batches[0][0].cuda(), batches[0][1].cuda())
    # Capturing ran the step twice on the first batch (warm-up, then the recorded run).
    local_losses = []
    for x, y in [batches[0], *batches]:
        loss = F.cross_entropy(local(x), y)
        local_optimizer.zero_grad()
        loss.backward()
        local_optimizer.step()
        local_losses.append(loss.item())
    remote_losses = []
    for x, y in batches[1:]:
        with remote.op_trace() as ops:
            remote_losses.append(step(x.cuda(), y.cuda()).item())
        assert [op for op in ops if op.startswith("libremote::")] == [f"libremote::replay({step.op_count} ops)"], ops
        assert not any(op.startswith(("aten::addmm", "aten::mm", "aten::_foreach")) for op in ops), ops
    torch.testing.assert_close(torch.tensor(remote_losses), torch.tensor(local_losses[2:]), rtol=1e-5, atol=1e-5)
    for remote_param, local_param in zip(model.parameters(), local.parameters()):
        torch.testing.assert_close(remote_param.detach().cpu(), local_param.detach(), rtol=1e-5, atol=1e-5)


def test_replays_keep_memory_steady(remote):
    model = _model().cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def train_step(x, y):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)  # grads are made anew in every replay
        loss.backward()
        optimizer.step()
        return loss

    (x, y), = _batches(1)
    step = libremote.capture_step(train_step, x.cuda(), y.cuda())
    readings = []
    for _ in range(5):
        step(x.cuda(), y.cuda())
        torch.cuda.synchronize()
        readings.append(torch.cuda.memory_allocated())
    assert len(set(readings)) == 1, readings
    assert model[0].weight.grad is not None and torch.isfinite(model[0].weight.grad.cpu()).all()


def test_a_sync_point_inside_the_step_is_refused_clearly(remote):
    model = _model().cuda()

    def logs_its_loss(x):
        loss = model(x).sum()
        print(loss.item())  # waits for the device: cannot be replayed
        return loss

    x = torch.randn(2, 12, device="cuda")
    with pytest.raises(libremote.CaptureError, match=r"cannot wait for the device"):
        libremote.capture_step(logs_its_loss, x)
    assert model(x).shape == (2, 3)  # the session goes on
    torch.cuda.synchronize()


def test_new_host_data_inside_the_step_is_refused(remote):
    def makes_a_constant(x):
        return x * torch.tensor([1.0, 2.0], device="cuda")

    with pytest.raises(libremote.CaptureError, match="new host data"):
        libremote.capture_step(makes_a_constant, torch.ones(2, device="cuda"))


def test_adam_without_capturable_is_refused_by_torch(remote):
    model = _model().cuda()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)  # step count on the host: baked in

    def train_step(x):
        model(x).sum().backward()
        optimizer.step()
        return model[0].weight

    with pytest.raises(RuntimeError, match="capturable is False"):
        libremote.capture_step(train_step, torch.randn(2, 12, device="cuda"))


def test_inputs_must_keep_their_shape(remote):
    step = libremote.capture_step(lambda x: x * 2, torch.ones(3, device="cuda"))
    torch.testing.assert_close(step(torch.arange(3.0, device="cuda")).cpu(), torch.tensor([0.0, 2.0, 4.0]))
    with pytest.raises(ValueError, match="keep their shape"):
        step(torch.ones(4, device="cuda"))


def test_raw_programs_hold_only_replayable_commands(raw):  # noqa: F811
    _, error, _ = raw.call([[Cmd.PROGRAM, 1, [[Cmd.FETCH, 1]]]])
    assert error is not None and error[0] == "protocol" and "replayed" in error[2], error
    _, error, _ = raw.call([[Cmd.REPLAY, 99]])
    assert error is not None and "never defined" in error[2], error


def test_raw_placeholders_are_checked_before_anything_is_allocated(raw):  # noqa: F811
    # A step recorded without running (torch.cuda.graph) names the results to allocate now: the
    # daemon checks their layouts and the session's quota first, and keeps serving either way.
    from libremote_wire import codec, torch_codec
    raw.put(1, torch.ones(4))
    add = [Cmd.OP, [1, "aten::add.Tensor"], [codec.handle_ext(1), codec.handle_ext(1)], {}, [2]]
    f32 = torch_codec.dtype_ext(torch.float32)
    before = raw.memory()["allocated"]
    _, error, _ = raw.call([[Cmd.PROGRAM, 1, [add], {"ran": False, "placeholders": [[2, f32, [1 << 40], [1], 0, 0]]}]])
    assert error is not None and error[0] == "oom", error
    assert raw.memory()["allocated"] == before
    _, error, _ = raw.call([[Cmd.PROGRAM, 1, [add], {"ran": False, "placeholders": [[2, f32, [-4], [1], 0, 0]]}]])
    assert error is not None and error[0] == "protocol" and "non-negative" in error[2], error
    _, error, _ = raw.call([[Cmd.PROGRAM, 1, [add], {"ran": False, "placeholders": [[2, f32, [4], [1], 0, 0]]}],
                            [Cmd.REPLAY, 1]])
    assert error is None, error
    assert torch.equal(raw.fetch(2), torch.full((4,), 2.0))


def test_the_step_keeps_what_it_closes_over_alive(remote):
    import gc

    def build():
        model = _model().cuda()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        (x, y), = _batches(1)
        x, y = x.cuda(), y.cuda()

        def train_step():
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=False)
            loss.backward()
            optimizer.step()
            return loss.detach()

        return train_step

    step = libremote.capture_step(build())  # nothing else holds the model, optimizer or data
    gc.collect()
    losses = [step().item() for _ in range(4)]
    assert losses == sorted(losses, reverse=True) and losses[0] > losses[-1], losses  # it trains


def test_a_replay_counts_the_last_results_until_it_replaces_them(remote):
    # A replay makes its results anew and then copies them into the tensors the last run made
    # (which the client still holds): for that while both exist on the daemon, and the session's
    # figures (its quota, its peak, an oversubscribed device's budget) must see both.
    weight = torch.randn(256, 256, device="cuda")
    step = libremote.capture_step(lambda x: (x @ weight).relu(), torch.randn(256, 256, device="cuda"))
    x = torch.randn(256, 256, device="cuda")
    out = step(x)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()  # the weight, the step's input, and `out`
    torch.cuda.reset_peak_memory_stats()
    again = step(x)
    torch.cuda.synchronize()
    result_bytes = 256 * 256 * 4
    # At the peak: what was there before, the matmul's result and the relu's (the new `out`).
    assert torch.cuda.max_memory_allocated() == before + 2 * result_bytes
    assert torch.cuda.memory_allocated() == before  # the new result went into the old tensor
    assert again is out or again.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out.cpu(), (x.cpu() @ weight.cpu()).relu())


# ------------------------------------------------------------------------------------------------
# torch.cuda.CUDAGraph / torch.cuda.graph: the same programs, recorded without running
# ------------------------------------------------------------------------------------------------
def _graph_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=False)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.detach()


@pytest.mark.parametrize("daemon_flags", [(), ("--emulate-cuda-graphs",)], ids=["interpreted", "emulated-cuda-graphs"])
def test_torch_cuda_graph_training_matches_local_eager(remote, daemon_flags):
    # The pattern of PyTorch's CUDA-graph docs: warm up, capture a whole step into static
    # tensors, then copy each batch in and replay. Capture runs nothing (the captured optimizer
    # step updates nothing until the first replay), so the losses are local eager's, step for step.
    batches = _batches(6)
    warm_up = batches[0]
    local = _model()
    local_optimizer = torch.optim.SGD(local.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        _graph_step(local, local_optimizer, *warm_up)
    expected = [_graph_step(local, local_optimizer, x, y).item() for x, y in batches]

    flags_context = pool_daemon(*daemon_flags) if daemon_flags else contextlib.nullcontext()
    with flags_context as server, (client_connected_to(server.address) if server else contextlib.nullcontext()):
        model = _model().cuda()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        static_x, static_y = warm_up[0].cuda(), warm_up[1].cuda()
        for _ in range(2):  # (the optimizer makes its momentum buffers outside the graph)
            _graph_step(model, optimizer, static_x, static_y)
        before = [p.detach().cpu() for p in model.parameters()]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            assert torch.cuda.is_current_stream_capturing()
            static_loss = _graph_step(model, optimizer, static_x, static_y)
        assert not torch.cuda.is_current_stream_capturing()
        for parameter, unchanged in zip(model.parameters(), before):
            assert torch.equal(parameter.detach().cpu(), unchanged)  # nothing ran while capturing
        # As CUDA's, the outputs exist from the capture on (uninitialised until a replay).
        assert static_loss.shape == () and torch.empty_like(static_loss).shape == ()
        got = []
        for x, y in batches:
            static_x.copy_(x)
            static_y.copy_(y)
            graph.replay()
            got.append(static_loss.item())
        final = [p.detach().cpu() for p in model.parameters()]
        replays = libremote.session_stats()["cuda_graph_replays"]
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    for parameter, local_parameter in zip(final, local.parameters()):
        torch.testing.assert_close(parameter, local_parameter.detach(), rtol=1e-5, atol=1e-6)
    if daemon_flags:
        assert replays >= 1  # after its warm-up replays the daemon launched the step as a graph


def test_a_cuda_graph_region_that_raises_records_nothing_and_refuses_sync_points(remote):
    x = torch.ones(8, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(ZeroDivisionError):
        with torch.cuda.graph(graph):
            y = x * 2
            raise ZeroDivisionError("an error inside the capture")
    assert not torch.cuda.is_current_stream_capturing()
    with pytest.raises(libremote.CaptureError, match="replay"):
        graph.replay()  # never captured
    assert (x * 3).sum().item() == 24.0  # the session goes on
    with pytest.raises(libremote.CaptureError, match="wait for the device"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            (x * 2).sum().item()
    assert not torch.cuda.is_current_stream_capturing()
    del y


def test_a_graphs_results_hold_memory_until_the_graph_goes(remote):
    # As a CUDA graph's private pool: what the capture made stays allocated (another graph may
    # read it) until the graph is reset or collected, even once the program drops its tensor.
    x = torch.ones(1 << 18, device="cuda")  # 1 MiB
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kept = x * 2
        dropped = kept + 1
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == baseline + 2 * x.nbytes  # allocated at capture, as CUDA's
    del dropped
    graph.replay()
    assert kept.sum().item() == 2 * x.numel()
    x.fill_(5.0)
    graph.replay()
    assert kept.sum().item() == 10 * x.numel()  # each replay writes the same output tensor
    assert torch.cuda.memory_allocated() == baseline + 2 * x.nbytes
    graph.reset()
    assert torch.cuda.memory_allocated() == baseline + x.nbytes  # only `kept`, which we hold
    assert kept.sum().item() == 10 * x.numel()


def test_make_graphed_callables_trains_like_the_module(remote):
    # torch's helper captures forward and backward as two graphs; the backward graph reads what
    # the forward graph's capture left for it (its outputs and autograd's saved tensors).
    torch.manual_seed(0)
    local = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3))
    module = copy.deepcopy(local).cuda()
    sample = torch.randn(6, 12).cuda().requires_grad_()
    graphed = torch.cuda.make_graphed_callables(module, (sample,))
    local_optimizer = torch.optim.SGD(local.parameters(), lr=0.1)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    # (make_graphed_callables warms up with autograd.grad: no parameter update, nothing to copy)
    for x, y in _batches(4):
        expected = F.cross_entropy(local(x), y)
        local_optimizer.zero_grad()
        expected.backward()
        local_optimizer.step()
        got = F.cross_entropy(graphed(x.cuda()), y.cuda())
        optimizer.zero_grad()
        got.backward()
        optimizer.step()
        assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    for parameter, local_parameter in zip(module.parameters(), local.parameters()):
        torch.testing.assert_close(parameter.detach().cpu(), local_parameter.detach(), rtol=1e-5, atol=1e-6)
