"""Replaying graph-mode graphs as CUDA graphs (server/cuda_graphs.py).

A CUDA graph reads and writes fixed addresses, so the daemon's replay rules decide what is safe:
new inputs are copied into the captured ones only when nobody else holds those, outputs a client
kept are never overwritten, inputs the graph writes are written back, random ops draw from the
session's stream. On machines without a GPU the daemon runs with ``--emulate-cuda-graphs``: the
same rules, with a stand-in that overwrites the captured outputs in place on every replay, so a
broken rule shows up here as a wrong result. The last test runs the real thing on a GPU.
"""

from __future__ import annotations

import json

import pytest
import torch

from libremote_wire import codec
from libremote_wire.messages import Cmd

from conftest import Daemon
from helpers import cuda_on_this_machine, run_python
from raw_client import RawClient

WARMUP_RUNS = 2  # server/cuda_graphs.py: interpreted runs before a capture
BIG = 300_000  # floats: 1.2 MB, above the size of outputs cloned after every replay


@pytest.fixture(scope="module")
def emulating():
    server = Daemon("--emulate-cuda-graphs")
    yield server
    server.stop()


@pytest.fixture
def raw(emulating):
    with RawClient(emulating.address) as client:
        client.hello()
        yield client


def _value(index: int):
    return codec.value_ext(index)


def _handles(*handles: int) -> list:
    return [codec.handle_ext(h) for h in handles]


def _stats(raw: RawClient) -> dict:
    results, error, _ = raw.call([[Cmd.QUERY, "stats"]])
    assert error is None, error
    return results[0]


def _run(raw: RawClient, graph_id: int, inputs: list[int], outs: list) -> None:
    _, error, _ = raw.call([[Cmd.RUN_GRAPH, graph_id, _handles(*inputs), outs]])
    assert error is None, error


# y = x * w + x  (value 2: x * w, value 3: the sum)
AFFINE = [["aten::mul.Tensor", [_value(0), _value(1)], {}], ["aten::add.Tensor", [_value(2), _value(0)], {}]]


def test_a_graph_replays_after_warming_up_and_new_inputs_are_copied_in(raw):
    raw.put(1, w := torch.randn(BIG))
    _, error, _ = raw.call([[Cmd.GRAPH, 1, 2, AFFINE, [_value(3)]]])
    assert error is None, error
    for call in range(6):
        x = torch.randn(BIG)
        raw.put(100 + call, x)
        _run(raw, 1, [100 + call, 1], [200 + call])
        torch.testing.assert_close(raw.fetch(200 + call), x * w + x, rtol=0, atol=0)
        raw.call([[Cmd.FREE, [100 + call, 200 + call]]])  # a training loop's batch and result go
    stats = _stats(raw)
    assert stats["cuda_graph_captures"] == 1 and stats["cuda_graph_replays"] == 6 - WARMUP_RUNS, stats


def test_an_input_the_client_still_holds_is_never_overwritten(raw):
    raw.put(1, torch.randn(BIG))
    raw.call([[Cmd.GRAPH, 1, 2, AFFINE, [_value(3)]]])
    inputs = [torch.randn(BIG) for _ in range(5)]
    for call, x in enumerate(inputs):  # every input stays alive: none may serve as the captured one
        raw.put(100 + call, x)
        _run(raw, 1, [100 + call, 1], [200 + call])
        raw.call([[Cmd.FREE, [200 + call]]])
    for call, x in enumerate(inputs):
        torch.testing.assert_close(raw.fetch(100 + call), x, rtol=0, atol=0)
    stats = _stats(raw)
    assert stats["cuda_graph_replays"] == 1, stats  # only the capture itself
    assert any("still held" in why for why in stats["cuda_graph_interpreted"]), stats


def test_outputs_kept_past_later_calls_stay_intact(raw):
    raw.put(1, w := torch.randn(BIG))
    raw.call([[Cmd.GRAPH, 1, 2, AFFINE, [_value(3)]]])
    inputs = [torch.randn(BIG) for _ in range(8)]
    for call, x in enumerate(inputs):
        raw.put(100 + call, x)
        _run(raw, 1, [100 + call, 1], [200 + call])  # results are all kept
        raw.call([[Cmd.FREE, [100 + call]]])
    for call, x in enumerate(inputs):
        torch.testing.assert_close(raw.fetch(200 + call), x * w + x, rtol=0, atol=0)
    stats = _stats(raw)
    # The first capture handed its output out; the client kept it, so the graph was captured
    # again to clone its outputs, and replayed from then on.
    assert stats["cuda_graph_captures"] == 2 and stats["cuda_graph_replays"] >= 3, stats


def test_a_graph_that_writes_a_new_input_writes_the_callers_tensor(raw):
    # x.add_(b) returns x itself: the output must be the caller's tensor, not the captured one.
    nodes = [["aten::add_.Tensor", [_value(0), _value(1)], {}]]
    raw.put(1, b := torch.randn(4))
    raw.call([[Cmd.GRAPH, 1, 2, nodes, [_value(2)]]])
    for call in range(5):
        x = torch.randn(4)
        raw.put(100 + call, x)
        _run(raw, 1, [100 + call, 1], [200 + call])
        torch.testing.assert_close(raw.fetch(100 + call), x + b, rtol=0, atol=0)
        # The output aliases the input: writing one shows in the other.
        _, error, _ = raw.call([[Cmd.OP, [1, "aten::mul_.Scalar"], [codec.handle_ext(200 + call), 3.0], {}, None]])
        assert error is None, error
        torch.testing.assert_close(raw.fetch(100 + call), (x + b) * 3, rtol=0, atol=0)
        raw.call([[Cmd.FREE, [100 + call, 200 + call]]])
    assert _stats(raw)["cuda_graph_replays"] == 5 - WARMUP_RUNS


def test_a_capture_lets_go_once_the_client_frees_what_it_was_captured_on(raw):
    """A finished model's graphs must not pin its memory: when the client frees a tensor the
    capture was made on (a parameter), the daemon's housekeeping drops the capture."""
    import time

    raw.put(1, torch.randn(BIG))  # "the parameter"
    raw.call([[Cmd.GRAPH, 1, 2, AFFINE, [_value(3)]]])
    for call in range(4):
        raw.put(100 + call, torch.randn(BIG))
        _run(raw, 1, [100 + call, 1], [200 + call])
        raw.call([[Cmd.FREE, [100 + call, 200 + call]]])
    assert _stats(raw)["cuda_graphs_live"] == 1
    raw.call([[Cmd.FREE, [1]]])
    deadline = time.monotonic() + 30
    while _stats(raw)["cuda_graphs_live"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _stats(raw)["cuda_graphs_live"] == 0
    raw.put(2, w := torch.randn(BIG))  # a new model: the graph warms up and is captured again
    for call in range(4):
        raw.put(300 + call, x := torch.randn(BIG))
        _run(raw, 1, [300 + call, 2], [400 + call])
        torch.testing.assert_close(raw.fetch(400 + call), x * w + x, rtol=0, atol=0)
        raw.call([[Cmd.FREE, [300 + call, 400 + call]]])
    stats = _stats(raw)
    assert stats["cuda_graphs_live"] == 1 and stats["cuda_graph_captures"] == 2, stats


def _random_graph_results(address: str) -> list[torch.Tensor]:
    # bernoulli takes the session's generator; native_dropout draws from the device's default.
    nodes = [["aten::bernoulli.p", [_value(0), 0.3], {}], ["aten::native_dropout", [_value(0), 0.5, True], {}],
             ["getitem", [_value(2), 0], {}], ["aten::add.Tensor", [_value(1), _value(3)], {}]]
    with RawClient(address) as client:
        client.hello()
        client.put(1, torch.ones(BIG))
        client.call([[Cmd.SEED, 1234], [Cmd.GRAPH, 1, 1, nodes, [_value(4)]]])
        results = []
        for call in range(5):
            _run(client, 1, [1], [100 + call])
            results.append(client.fetch(100 + call))
            client.call([[Cmd.FREE, [100 + call]]])
        return results


def test_random_ops_draw_the_same_numbers_as_interpreted(emulating, daemon):
    replayed, interpreted = _random_graph_results(emulating.address), _random_graph_results(daemon.address)
    for a, b in zip(replayed, interpreted):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(replayed[-1], replayed[-2])  # the stream moves on between calls


def _train(tmp_path, device: str, *daemon_args: str,
           client: str = "compiled_training_with_kept_outputs.py") -> tuple[dict, dict]:
    server = Daemon(*daemon_args, device=device)
    path = tmp_path / f"state{'-'.join(daemon_args) or '-default'}.pt"
    try:
        out = run_python(client, str(path), timeout=600, TEST_SERVER=server.address)
        assert out.returncode == 0, out.stderr + server.log()
    finally:
        server.stop()
    return json.loads(out.stdout.strip().splitlines()[-1]), torch.load(path)


def _compare_training(tmp_path, device: str, replaying: str, interpreting: str, tolerance: float) -> None:
    replayed, replayed_state = _train(tmp_path, device, *filter(None, [replaying]))
    interpreted, interpreted_state = _train(tmp_path, device, interpreting)
    summary = {key: replayed[key] for key in ("captures", "replays", "interpreted")}
    assert replayed["captures"] >= 4 and replayed["replays"] >= 16, summary
    assert interpreted["replays"] == 0
    torch.testing.assert_close(torch.tensor(replayed["losses"]), torch.tensor(interpreted["losses"]),
                               rtol=tolerance, atol=tolerance)
    assert replayed_state.keys() == interpreted_state.keys()
    for name in replayed_state:
        torch.testing.assert_close(replayed_state[name], interpreted_state[name], rtol=tolerance, atol=tolerance,
                                   msg=name)


def test_compiled_training_replayed_matches_interpreted_bit_for_bit(tmp_path):
    """Dropout, BatchNorm statistics, a new batch every step and an output kept past the next
    call, through the replay rules and through the interpreter: the same bits."""
    _compare_training(tmp_path, "cpu", "--emulate-cuda-graphs", "--no-cuda-graphs", tolerance=0.0)


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_on_this_machine(), reason="needs a CUDA device for the daemon")
def test_compiled_training_replayed_as_cuda_graphs_matches_interpreted(tmp_path):
    _compare_training(tmp_path, "cuda", "", "--no-cuda-graphs", tolerance=1e-5)


def test_captured_step_replayed_in_place_matches_interpreted_bit_for_bit(tmp_path):
    replayed, replayed_state = _train(tmp_path, "cpu", "--emulate-cuda-graphs", client="capture_step_training.py")
    interpreted, interpreted_state = _train(tmp_path, "cpu", "--no-cuda-graphs", client="capture_step_training.py")
    summary = {key: replayed[key] for key in ("captures", "replays", "interpreted")}
    assert replayed["replays"] >= 6 and interpreted["replays"] == 0, summary
    assert replayed["losses"] == interpreted["losses"]
    for name in replayed_state:
        assert torch.equal(replayed_state[name], interpreted_state[name]), name


@pytest.mark.parametrize("mode", ["--emulate-cuda-graphs", "--no-cuda-graphs"])
def test_captured_step_outputs_update_in_place_and_a_replaced_tensor_is_an_error(emulating, mode):
    server = Daemon(mode)
    try:
        out = run_python("capture_step_static_outputs.py", timeout=300, TEST_SERVER=server.address)
        assert out.returncode == 0, out.stderr + server.log()
    finally:
        server.stop()
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert all(report["same"]), report
    assert all(loss == viewed for loss, viewed in report["seen"]), report  # the view sees each replay
    assert len({loss for loss, _ in report["seen"]}) > 1, report  # and the values do change
    assert report["error"] and "freed since it was recorded" in report["error"], report
    if mode == "--emulate-cuda-graphs":
        assert report["replays"] >= 4, report
        assert any("freed or replaced" in why for why in report["interpreted"]), report


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_on_this_machine(), reason="needs a CUDA device for the daemon")
def test_captured_step_launched_as_one_cuda_graph_matches_interpreted(tmp_path):
    replayed, replayed_state = _train(tmp_path, "cuda", client="capture_step_training.py")
    interpreted, interpreted_state = _train(tmp_path, "cuda", "--no-cuda-graphs", client="capture_step_training.py")
    summary = {key: replayed[key] for key in ("captures", "replays", "interpreted")}
    assert replayed["replays"] >= 6 and interpreted["replays"] == 0, summary
    torch.testing.assert_close(torch.tensor(replayed["losses"]), torch.tensor(interpreted["losses"]), rtol=1e-5, atol=1e-6)
    for name in replayed_state:
        torch.testing.assert_close(replayed_state[name], interpreted_state[name], rtol=1e-5, atol=1e-6, msg=name)
