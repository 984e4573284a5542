"""Graph mode compiled on the daemon with inductor (``--graph-compiler inductor``,
server/compiled_graphs.py): parity with local eager torch, graphs that must stay interpreted,
and the guard that keeps compiled code to the inputs it was compiled for.

Compiling runs in the daemon's background; these tests wait for it through
``session_stats()["graph_compiles_pending"]`` (a bound on "it did not hang", not a speed check).
On the CPU backend inductor writes C++ and builds it with the machine's compiler.
"""

from __future__ import annotations

import copy
import os
import re
import time
from collections.abc import Callable

import pytest
import torch
from torch import nn

from libremote_wire import codec, torch_codec
from libremote_wire.cli import format_status
from libremote_wire.messages import Cmd

from conftest import Daemon, client_connected_to
from helpers import cuda_on_this_machine, session_of, status
from raw_client import RawClient
from workloads import train_steps, workload

#: Upper bound for the daemon's compiles to finish on a slow 2-core CI machine.
COMPILE_TIMEOUT_S = 300.0


@pytest.fixture(scope="module")
def compiling_daemon():
    server = Daemon("--graph-compiler", "inductor")
    yield server
    server.stop()


@pytest.fixture
def compiling(compiling_daemon):
    with client_connected_to(compiling_daemon.address) as libremote:
        yield libremote


def _wait_for_compiles(stats) -> dict:
    deadline = time.monotonic() + COMPILE_TIMEOUT_S
    while (current := stats())["graph_compiles_pending"]:
        assert time.monotonic() < deadline, f"compiles still pending after {COMPILE_TIMEOUT_S} s: {current}"
        time.sleep(0.1)
    return current


@pytest.mark.parametrize("kind,tolerance", [("mlp_batchnorm", 1e-5), ("transformer", 2e-4)])
def test_compiled_training_matches_local_eager(compiling_daemon, compiling, kind, tolerance):
    """Forward and backward compiled by inductor: BatchNorm's running statistics written back by
    the compiled code; attention (tagged random for its dropout, compiled at ``dropout_p=0``)
    kept as the device's fused kernel. Losses, parameters and buffers as local eager torch has
    them."""
    model, data, target, loss_fn = workload(kind)
    local = copy.deepcopy(model)
    # SGD, not Adam: the bias of a Linear before a BatchNorm has an exactly-zero true gradient,
    # whose rounding noise (fused kernels round differently) Adam would scale up to +-lr a step.
    local_losses, _ = train_steps(local, data, target, loss_fn, 6, adam=False)

    compiled = torch.compile(model.cuda())
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    data, target = data.cuda(), target.cuda()
    losses = []
    for step in range(6):
        loss = loss_fn(compiled(data), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step == 0:  # the first call starts both compiles and is interpreted meanwhile
            _wait_for_compiles(compiling.session_stats)
    stats = compiling.session_stats()
    assert stats["graphs_compiled"] == 2, stats  # forward and backward
    assert stats["compiled_graph_runs"] == 10, stats  # steps 2-6, forward and backward
    # What an operator sees: the session's row, and the compiler's line in `libremote status`.
    report = status(compiling_daemon.address)
    row = session_of(report, os.getpid())
    assert row["graphs_compiled"] == 2 and row["graph_compiles_pending"] == 0 and row["graph_compile_s"] > 0, row
    assert "graph compiler inductor: 2 graphs compiled, 0 compiling" in format_status(report)
    _assert_same_training(losses, local_losses, model.cpu(), local, tolerance)


def test_a_graph_with_random_ops_stays_interpreted(compiling):
    """Dropout draws from the session's generator only when interpreted: that graph is not
    compiled (the reason shows in the stats), and the seeded run gives the interpreter's numbers."""
    def run() -> list[float]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 4)).cuda()
        compiled = torch.compile(model)
        torch.cuda.manual_seed(1234)
        data = torch.randn(8, 16, generator=torch.Generator().manual_seed(1)).cuda()
        return [compiled(data).sum().item() for _ in range(3)]

    with_compiler = run()
    stats = _wait_for_compiles(compiling.session_stats)
    reasons = stats["graphs_not_compiled"]
    assert any(why.startswith("random op aten::native_dropout") for why in reasons), stats
    assert stats["compiled_graph_runs"] == 0, stats
    plain = Daemon()
    try:
        with client_connected_to(plain.address):
            interpreted = run()
    finally:
        plain.stop()
    assert with_compiler == interpreted


def _value(index: int):
    return codec.value_ext(index)


def _raw_stats(raw: RawClient) -> Callable[[], dict]:
    def stats() -> dict:
        results, error, _ = raw.call([[Cmd.QUERY, "stats"]])
        assert error is None, error
        return results[0]

    return stats


def test_compiled_code_runs_only_on_inputs_like_the_ones_it_was_compiled_for(compiling_daemon):
    """Raw protocol: a graph that writes its input and returns it (an alias) and a product.
    Compiled, it writes the caller's tensor and hands out a view of it; a call with a differently
    shaped input runs interpreted, and is exact too."""
    # x.add_(b) -> value 2 (x itself), value 2 * 2 -> value 3
    nodes = [["aten::add_.Tensor", [_value(0), _value(1)], {}], ["aten::mul.Tensor", [_value(2), 2.0], {}]]
    with RawClient(compiling_daemon.address) as raw:
        raw.hello()
        stats = _raw_stats(raw)

        raw.put(1, b := torch.tensor(0.25))
        _, error, _ = raw.call([[Cmd.GRAPH, 7, 2, nodes, [_value(2), _value(3)]]])
        assert error is None, error
        for call, size in enumerate([64, 64, 64, 32]):
            x = torch.randn(size)
            raw.put(100 + call, x)
            _, error, _ = raw.call([[Cmd.RUN_GRAPH, 7, [codec.handle_ext(100 + call), codec.handle_ext(1)],
                                     [200 + call, 300 + call]]])
            assert error is None, error
            if call == 0:
                _wait_for_compiles(stats)
            torch.testing.assert_close(raw.fetch(100 + call), x + b, rtol=0, atol=0)
            torch.testing.assert_close(raw.fetch(300 + call), (x + b) * 2, rtol=0, atol=0)
            # The first output is the input: writing it shows in the caller's tensor.
            _, error, _ = raw.call([[Cmd.OP, [1, "aten::mul_.Scalar"], [codec.handle_ext(200 + call), 3.0], {},
                                     None]])
            assert error is None, error
            torch.testing.assert_close(raw.fetch(100 + call), (x + b) * 3, rtol=0, atol=0)
        final = stats()
        assert final["compiled_graph_runs"] == 2, final  # calls 2 and 3
        assert final["graphs_not_compiled"] == {"compiling": 1, "inputs differ from the compiled call's": 1}, final


def test_a_graph_with_a_tensor_constant_compiles(compiling_daemon):
    """A tensor sent inline in a node (a constant the traced model made) becomes a buffer of the
    compiled module, and the compiled code computes with it."""
    constant = torch.tensor([1.0, -2.0, 0.5, 4.0])
    nodes = [["aten::mul.Tensor", [_value(0), torch_codec.inline_tensor_ext(constant)], {}]]
    with RawClient(compiling_daemon.address) as raw:
        raw.hello()
        stats = _raw_stats(raw)
        _, error, _ = raw.call([[Cmd.GRAPH, 1, 1, nodes, [_value(1)]]])
        assert error is None, error
        for call in range(3):
            raw.put(100 + call, x := torch.randn(4))
            _, error, _ = raw.call([[Cmd.RUN_GRAPH, 1, [codec.handle_ext(100 + call)], [200 + call]]])
            assert error is None, error
            if call == 0:
                _wait_for_compiles(stats)
            torch.testing.assert_close(raw.fetch(200 + call), x * constant, rtol=0, atol=0)
        final = stats()
    assert final["graphs_compiled"] == 1 and final["compiled_graph_runs"] == 2, final


def test_a_graph_inductor_cannot_compile_stays_interpreted(compiling_daemon):
    """``nonzero`` sizes its result by the values, which inductor cannot compile without a
    shape environment: the compile fails in the background, the reason is reported, and every
    call is interpreted and exact."""
    with RawClient(compiling_daemon.address) as raw:
        raw.hello()
        stats = _raw_stats(raw)

        _, error, _ = raw.call([[Cmd.GRAPH, 1, 1, [["aten::nonzero.default", [_value(0)], {}]], [_value(1)]]])
        assert error is None, error
        for call in range(3):
            x = torch.tensor([0.0, 1.5, 0.0, -2.0, float(call)])
            raw.put(100 + call, x)
            _, error, _ = raw.call([[Cmd.RUN_GRAPH, 1, [codec.handle_ext(100 + call)], [200 + call]]])
            assert error is None, error
            if call == 0:
                _wait_for_compiles(stats)
            torch.testing.assert_close(raw.fetch(200 + call), torch.nonzero(x), rtol=0, atol=0)
        final = stats()
    assert final["graphs_compiled"] == 0 and final["compiled_graph_runs"] == 0, final
    reasons = final["graphs_not_compiled"]
    failed = [why for why in reasons if why.startswith("compile failed: DynamicOutputShapeException")]
    assert failed and reasons[failed[0]] == 2, final  # calls 2 and 3; call 1 ran while compiling


def test_sessions_under_residency_management_are_not_compiled():
    """Compiled code reads inputs where they lie; the memory manager must be able to restore each
    first, so a daemon that spills interprets its graphs (and says so: nothing compiled)."""
    server = Daemon("--graph-compiler", "inductor", "--device-memory", "64MiB", "--host-spill", "64MiB")
    try:
        with client_connected_to(server.address) as libremote:
            local = nn.Linear(8, 8)
            compiled = torch.compile(copy.deepcopy(local).cuda())
            x = torch.randn(4, 8)
            for _ in range(3):
                torch.testing.assert_close(compiled(x.cuda()).cpu(), local(x).detach(), rtol=1e-6, atol=1e-6)
            stats = libremote.session_stats()
        assert stats["graphs_compiled"] == 0 and stats["graph_compiles_pending"] == 0, stats
        assert stats["graphs_not_compiled"] == {}, stats
    finally:
        server.stop()


def _captured_training(*daemon_args: str, device: str = "cpu") -> tuple[dict, list, list, nn.Module, nn.Module]:
    """Train the BatchNorm MLP with a captured step (SGD) on a compiling daemon, and locally.
    Returns the session's stats, the replays' losses, local eager's losses, both models."""
    server = Daemon("--graph-compiler", "inductor", *daemon_args, device=device)
    try:
        with client_connected_to(server.address) as libremote:
            model, data, target, loss_fn = workload("mlp_batchnorm")
            local = copy.deepcopy(model)
            local_losses, _ = train_steps(local, data, target, loss_fn, 8, adam=False)

            compiled = torch.compile(model.cuda())
            optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)

            def train_step(x, y):
                loss = loss_fn(compiled(x), y)
                optimizer.zero_grad(set_to_none=False)
                loss.backward()
                optimizer.step()
                return loss

            # Two real steps here: the warm-up (SGD makes its momentum buffers) and the recording.
            step = libremote.capture_step(train_step, data.cuda(), target.cuda())
            losses = []
            for index in range(6):
                losses.append(step(data.cuda(), target.cuda()).item())
                if index == 0:
                    _wait_for_compiles(libremote.session_stats)
            stats = libremote.session_stats()
            model.cpu()
    finally:
        server.stop()
    return stats, losses, local_losses[2:], model, local


def _summary(stats: dict) -> dict:
    return {key: stats[key] for key in ("graphs_compiled", "compiled_graph_runs", "cuda_graph_captures",
                                        "cuda_graph_replays", "cuda_graph_interpreted", "graphs_not_compiled")}


def _assert_same_training(losses: list, local_losses: list, model: nn.Module, local: nn.Module,
                          tolerance: float) -> None:
    torch.testing.assert_close(losses, local_losses, rtol=tolerance, atol=tolerance / 10)
    for (name, expected), actual in zip(local.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance / 10, msg=name)


def test_a_captured_step_records_the_compiled_code():
    """``capture_step`` on a daemon that compiles and replays by the CUDA-graph rules (emulated
    on the CPU backend): its graph runs are the compiled code, and training matches local eager
    torch. (That the capture waits for the compiles shows only on a GPU: the emulation runs the
    step anew at every replay.)"""
    stats, losses, local_losses, model, local = _captured_training("--emulate-cuda-graphs")
    assert stats["graphs_compiled"] >= 2, _summary(stats)
    assert stats["cuda_graph_captures"] >= 1 and stats["cuda_graph_replays"] >= 3, _summary(stats)
    # Every replay after the compiles ran the forward and backward as compiled code.
    assert stats["compiled_graph_runs"] >= 2 * 5, _summary(stats)
    _assert_same_training(losses, local_losses, model, local, 1e-5)


@pytest.mark.gpu
def test_on_a_gpu_the_captured_step_launches_the_compiled_kernels():
    """Triton kernels from inductor, recorded in the step's CUDA graph once the compiles are done:
    the same training as local eager torch on the CPU, to float rounding."""
    if not cuda_on_this_machine():
        pytest.skip("needs a CUDA device for the daemon")
    stats, losses, local_losses, model, local = _captured_training(device="cuda")
    assert stats["graphs_compiled"] >= 2, _summary(stats)
    assert stats["cuda_graph_captures"] >= 1 and stats["cuda_graph_replays"] >= 3, _summary(stats)
    # The capture ran the compiled forward and backward (launches after it run no Python).
    assert stats["compiled_graph_runs"] >= 2, _summary(stats)
    _assert_same_training(losses, local_losses, model, local, 1e-4)


def test_the_compiled_graph_applies_the_interpreters_sanitizers():
    """What inductor compiles is what the interpreter would run: ``_index_put_impl_`` with
    ``unsafe=True`` (no bounds checks) becomes the checked call, as op_policy makes it for single
    ops and interpreted graphs."""
    from libremote_server.worker import compiled_graphs, graphs

    nodes = [["aten::_index_put_impl_.default", [_value(0), [_value(1)], _value(2), False, True], {}]]
    module = compiled_graphs.to_fx(graphs.define(3, nodes, [_value(3)]), lambda ref: torch.device("cpu"))
    (call,) = [node for node in module.graph.nodes if node.op == "call_function"]
    assert call.target is torch.ops.aten._index_put_impl_.default
    assert call.args[3:] == (False, False), call.args


def test_compiled_code_runs_only_graphs_whose_arguments_pass_the_per_call_checks():
    """Compiled code never calls back into op_policy's per-call checks: a graph whose constant
    arguments fail them (a raw integer dtype, a device string), or whose checks depend on its
    input tensors (a view with explicit strides), stays interpreted, where they run per call."""
    from libremote_server.worker import compiled_graphs, graphs

    cpu = torch.device("cpu")

    def reason(node: list) -> str | None:
        node, output = torch_codec.unpackb(codec.packb([node, _value(1)]))  # as the daemon decodes it
        graph = graphs.define(1, [node], [output])
        return compiled_graphs.argument_refusal(graph, cpu, lambda ref: cpu)

    assert reason(["aten::_to_copy", [_value(0)], {"dtype": torch_codec.dtype_ext(torch.float64)}]) is None
    assert reason(["aten::_to_copy", [_value(0)], {"device": codec.device_ext(0)}]) is None
    assert reason(["aten::mul.Tensor", [_value(0), 2.0], {}]) is None
    assert "must be a ScalarType" in reason(["aten::_to_copy", [_value(0)], {"dtype": -1}])
    assert "devices" in reason(["aten::_to_copy", [_value(0)], {"device": "cuda:1"}])
    assert "explicit strides" in reason(["aten::as_strided", [_value(0), [2], [1]], {}])


def test_a_session_that_leaves_does_not_keep_its_compiles_queued():
    """A worker compiles one graph at a time. A client that sends four graphs and leaves gets at
    most the compile already running: its worker stops (with the rest of its queue), and the next
    client's graph compiles."""
    from libremote_wire.messages import Msg

    server = Daemon("--graph-compiler", "inductor")
    try:
        with RawClient(server.address) as leaver:
            leaver.hello()
            leaver.put(1, torch.randn(16))
            for graph_id in range(1, 5):  # graph i: i + 1 chained multiplications
                nodes = [["aten::mul.Tensor", [_value(position), 1.5], {}] for position in range(graph_id + 1)]
                _, error, _ = leaver.call([[Cmd.GRAPH, graph_id, 1, nodes, [_value(graph_id + 1)]],
                                           [Cmd.RUN_GRAPH, graph_id, [codec.handle_ext(1)], [100 + graph_id]]])
                assert error is None, error
            leaver.send([Msg.BYE])
        with RawClient(server.address) as stayer:
            stayer.hello()
            stats = _raw_stats(stayer)
            stayer.put(1, x := torch.randn(16))
            _, error, _ = stayer.call([[Cmd.GRAPH, 1, 1, [["aten::add.Tensor", [_value(0), 2.0], {}]], [_value(1)]],
                                       [Cmd.RUN_GRAPH, 1, [codec.handle_ext(1)], [2]]])
            assert error is None, error
            final = _wait_for_compiles(stats)
            assert final["graphs_compiled"] == 1, final
            torch.testing.assert_close(stayer.fetch(2), x + 2, rtol=0, atol=0)
        log = server.log()
    finally:
        server.stop()
    # The leaver's graphs have 2 to 5 ops; at most the one being compiled when it left finished.
    assert sum(log.count(f"compiled a graph of {ops} ops with inductor") for ops in range(2, 6)) <= 1, log
    assert re.search(r"worker \w+ \(session:\w+\) stopped", log), log  # the leaver's, with its queue


@pytest.mark.parametrize("node,random", [
    (["aten::native_dropout.default", [_value(0), 0.5, True], {}], True),
    (["aten::native_dropout.default", [_value(0), 0.5, False], {}], False),  # evaluation: the input as it is
    (["aten::native_dropout.default", [_value(0), 0.0, True], {}], False),
    (["aten::bernoulli.p", [_value(0), 0.5], {}], True),
    (["aten::_scaled_dot_product_fused_attention_overrideable.default",
      [_value(0), _value(0), _value(0), None, 0.0, True], {}], False),
    (["aten::_scaled_dot_product_fused_attention_overrideable.default",
      [_value(0), _value(0), _value(0)], {"dropout_p": 0.1}], True),
])
def test_only_graphs_that_draw_random_numbers_are_refused(node, random):
    from libremote_server.worker import compiled_graphs, graphs

    reason = compiled_graphs.refusal(graphs.define(1, [node], [_value(1)]))
    assert (reason is not None and reason.startswith("random op")) == random, reason
