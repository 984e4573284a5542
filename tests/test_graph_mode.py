"""Graph mode: ``torch.compile`` under libremote ships forward and backward aten graphs once and
runs them by handle. Parity with local eager torch, recompiles, fallbacks, and the daemon's
checks on graphs it is sent."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from libremote_wire import codec
from libremote_wire.messages import Cmd

from workloads import train_steps, workload

F = nn.functional


@pytest.mark.parametrize("kind,tolerance", [("mlp_batchnorm", 1e-5), ("cnn", 1e-5), ("transformer", 2e-4)])
def test_compiled_training_matches_local_eager(remote, kind, tolerance):
    model, data, target, loss_fn = workload(kind)
    local = copy.deepcopy(model)
    adam = kind != "transformer"
    local_losses, _ = train_steps(local, data, target, loss_fn, 4, adam=adam)

    compiled = torch.compile(model.cuda())
    remote_losses, traces = train_steps(compiled, data.cuda(), target.cuda(), loss_fn, 4, trace=remote.op_trace, adam=adam)

    torch.testing.assert_close(torch.tensor(remote_losses), torch.tensor(local_losses), rtol=tolerance, atol=tolerance)
    for remote_param, local_param in zip(model.parameters(), local.parameters()):
        torch.testing.assert_close(remote_param.detach().cpu(), local_param.detach(), rtol=tolerance, atol=tolerance)
    for remote_buffer, local_buffer in zip(model.buffers(), local.buffers()):  # BatchNorm running stats
        torch.testing.assert_close(remote_buffer.cpu(), local_buffer, rtol=tolerance, atol=tolerance)
    assert compiled.compiles == 1
    for ops in traces[1:]:
        graphs = [op for op in ops if op.startswith("libremote::graph")]
        assert len(graphs) == 2, ops  # one forward graph, one backward graph per step
        # The model's own ops travel inside the graphs, not one by one.
        assert not any(op.startswith(("aten::convolution", "aten::addmm", "aten::mm")) for op in ops), ops


def test_recompiles_only_when_the_signature_changes(remote):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    local = copy.deepcopy(model)
    compiled = torch.compile(model.cuda())

    def check(batch: int) -> None:
        x = torch.randn(batch, 8)
        torch.testing.assert_close(compiled(x.cuda()).detach().cpu(), local(x).detach(), rtol=1e-5, atol=1e-6)

    check(4)
    check(4)
    assert compiled.compiles == 1
    check(6)  # a new shape: a new graph
    assert compiled.compiles == 2
    check(4)  # seen before: no trace
    assert compiled.compiles == 2
    with torch.no_grad():  # inference: a graph without a backward
        check(4)
    assert compiled.compiles == 3
    compiled.eval()
    check(4)
    assert compiled.compiles == 4


def test_compiled_function_and_decorator_forms(remote):
    @torch.compile
    def gelu_mix(a, b):
        return F.gelu(a * b) + b.sin()

    @torch.compile(mode="reduce-overhead", fullgraph=True)
    def scale(t):
        return t * 2 - 1

    a, b = torch.randn(5, 7), torch.randn(5, 7)
    with remote.op_trace() as ops:
        result = gelu_mix(a.cuda(), b.cuda())
    torch.testing.assert_close(result.cpu(), F.gelu(a * b) + b.sin(), rtol=1e-5, atol=1e-6)
    assert [op for op in ops if op.startswith("libremote::graph")] == ["libremote::graph(4 ops)"], ops
    torch.testing.assert_close(scale(a.cuda()).cpu(), a * 2 - 1)


def test_code_that_reads_tensor_values_runs_eagerly_with_a_warning(remote):
    def clip_if_large(t):
        if t.abs().max() > 1.0:  # reads a value: cannot be one graph
            return t.clamp(-1, 1)
        return t

    compiled = torch.compile(clip_if_large)
    x = torch.randn(10) * 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = compiled(x.cuda())
    assert any("runs eagerly" in str(w.message) for w in caught), [str(w.message) for w in caught]
    torch.testing.assert_close(result.cpu(), x.clamp(-1, 1))


def test_repeated_compiled_steps_do_not_leak_device_memory(remote):
    torch.manual_seed(0)
    model = torch.compile(nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64)).cuda())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(32, 64, device="cuda")
    readings = []
    for _ in range(6):
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()
        readings.append(torch.cuda.memory_allocated())
    assert readings[-1] == readings[2], readings  # steady state: intermediates are freed


# ------------------------------------------------------------------------------------------------
# What the daemon accepts as a graph (raw protocol: no libremote client code)
# ------------------------------------------------------------------------------------------------
def _value(index: int):
    return codec.value_ext(index)


def test_raw_graph_runs_and_frees_intermediates(raw):  # noqa: F811
    raw.put(1, torch.tensor([1.0, 2.0, 3.0]))
    raw.put(2, torch.tensor([10.0, 20.0, 30.0]))
    nodes = [
        ["aten::mul.Tensor", [_value(0), _value(1)], {}],  # value 2
        ["aten::add.Tensor", [_value(2), _value(0)], {"alpha": 2}],  # value 3
        ["aten::neg", [_value(3)], {}],  # value 4
    ]
    results, error, _ = raw.call([[Cmd.GRAPH, 7, 2, nodes, [_value(4), _value(2)]],
                                  [Cmd.RUN_GRAPH, 7, [codec.handle_ext(1), codec.handle_ext(2)], [3, 4]]])
    assert error is None, error
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0])
    torch.testing.assert_close(raw.fetch(3), -(a * b + 2 * a))
    torch.testing.assert_close(raw.fetch(4), a * b)
    # Run again on other inputs: the definition stays.
    raw.put(5, torch.ones(3))
    _, error, _ = raw.call([[Cmd.RUN_GRAPH, 7, [codec.handle_ext(5), codec.handle_ext(5)], [6, None]]])
    assert error is None, error
    torch.testing.assert_close(raw.fetch(6), -torch.full((3,), 3.0))


@pytest.mark.parametrize("nodes,outputs,expected", [
    ([["aten::from_file", ["/etc/passwd"], {"size": 4}]], [_value(1)], "refused"),
    ([["aten::neg", [_value(5)], {}]], [_value(1)], "protocol"),  # uses a value before it exists
    ([["aten::neg", [_value(0)], {}]], [_value(9)], "protocol"),  # outputs a missing value
    ([["getitem", [_value(0)], {}]], [], "protocol"),
    ([["aten::neg"]], [], "protocol"),
    ("not a list", [], "protocol"),
])
def test_raw_bad_graphs_are_refused_and_the_session_goes_on(raw, nodes, outputs, expected):  # noqa: F811
    _, error, _ = raw.call([[Cmd.GRAPH, 1, 1, nodes, outputs]])
    assert error is not None and error[0] == expected, error
    # Running a graph that was never defined is an error too, and names the graph.
    _, error, _ = raw.call([[Cmd.RUN_GRAPH, 1, [None], [2]]])
    assert error is not None and "never defined" in error[2], error
    raw.put(3, torch.tensor([4.0]))  # the session still works
    torch.testing.assert_close(raw.fetch(3), torch.tensor([4.0]))


def test_raw_graph_op_failure_names_the_op_and_poisons_outputs(raw):  # noqa: F811
    raw.put(1, torch.ones(2, 3))
    nodes = [["aten::mm", [_value(0), _value(0)], {}]]  # 2x3 @ 2x3: a shape error at run time
    _, error, _ = raw.call([[Cmd.GRAPH, 2, 1, nodes, [_value(1)]],
                            [Cmd.RUN_GRAPH, 2, [codec.handle_ext(1)], [2]]])
    assert error is not None and error[0] == "op" and "aten::mm" in error[1] and "compiled graph" in error[1], error
    results, error, _ = raw.call([[Cmd.FETCH, 2]])
    assert error[0] == "handle" and "aten::mm" in error[2], error


class _Recurrent(nn.Module):
    def __init__(self, cell: type) -> None:
        super().__init__()
        self.rnn = cell(8, 16, batch_first=True)
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("name,build,data", [
    ("lstm", lambda: _Recurrent(nn.LSTM), lambda: torch.randn(3, 5, 8)),
    ("gru", lambda: _Recurrent(nn.GRU), lambda: torch.randn(3, 5, 8)),
    ("dropout", lambda: nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.5), nn.Linear(32, 1)), lambda: torch.randn(4, 8)),
    ("embedding", lambda: nn.Sequential(nn.Embedding(50, 8), nn.Flatten(), nn.Linear(24, 1)),
     lambda: torch.randint(0, 50, (4, 3))),
])
def test_more_module_kinds_compile_and_match(remote, name, build, data):
    torch.manual_seed(0)
    model = build()
    local = copy.deepcopy(model)
    x = data()
    torch.manual_seed(1)  # dropout: the CPU daemon's generator gives local CPU's numbers
    compiled = torch.compile(model.cuda())
    out = compiled(x.cuda())
    out.sum().backward()  # an expanded (zero-stride) gradient reaches the compiled backward
    torch.manual_seed(1)
    expected = local(x)
    expected.sum().backward()
    assert compiled.compiles == 1
    torch.testing.assert_close(out.detach().cpu(), expected.detach(), rtol=1e-5, atol=1e-6)
    for remote_param, local_param in zip(model.parameters(), local.parameters()):
        torch.testing.assert_close(remote_param.grad.cpu(), local_param.grad, rtol=1e-5, atol=1e-6)
