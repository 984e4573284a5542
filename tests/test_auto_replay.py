"""Repeated steps replayed without the program asking (``LIBREMOTE_AUTO_REPLAY``): exact.

Each test runs a loop twice, once on the shared CPU daemon in a session of its own with the
feature on (after 3 alike steps, a step is sent as one RUN_STEP) and once on local CPU torch,
and compares every loss and parameter with ``torch.equal`` / ``==``: a replayed step is the very
commands op by op would have sent (libremote/client/auto_replay.py,
server/worker/repeated_steps.py), so not an ulp may differ. The counters of
``libremote.session_stats()`` show that replays happened, and why a step went op by op.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import Daemon, client_connected_to

STEPS = 8


@pytest.fixture
def auto_session(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """libremote connected to the shared daemon in a new session with the feature on."""
    monkeypatch.setenv("LIBREMOTE_AUTO_REPLAY", "3")
    with client_connected_to(daemon.address) as libremote:
        yield libremote


def _stats(libremote: Any) -> dict[str, Any]:
    return {key: value for key, value in libremote.session_stats().items() if key.startswith("auto_replay")}


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().cpu() for p in model.parameters()]


def _state(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [{k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in s.items()} for s in optimizer.state.values()]


def _assert_same(remote: dict[str, Any], local: dict[str, Any]) -> None:
    assert remote["losses"] == local["losses"]
    for got, expected in zip(remote["params"], local["params"], strict=True):
        assert got.dtype == expected.dtype and torch.equal(got, expected)
    for got, expected in zip(remote.get("state", []), local.get("state", []), strict=True):
        assert got.keys() == expected.keys()
        for key in expected:
            if isinstance(expected[key], torch.Tensor):
                assert torch.equal(got[key], expected[key]), key
            else:
                assert got[key] == expected[key], key


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Dropout(0.2), nn.Linear(32, 32), nn.Tanh(),
                                 nn.Linear(32, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 32)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)))


def _mlp_batch(generator: torch.Generator, step: int, rows: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(rows, 12, generator=generator), torch.randn(rows, 5, generator=generator)


def _mlp_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, y)


def _tokens_batch(generator: torch.Generator, step: int, rows: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(0, 32, (rows, 8), generator=generator), torch.randint(0, 32, (rows, 8), generator=generator)


def _token_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, 32), y.reshape(-1))


_OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "adamw-foreach": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01, foreach=True),
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
}


def _train(device: str, factory: Callable[[], nn.Module], optimizer_name: str, make_batch: Any, loss_fn: Any,
           body: Callable[..., torch.Tensor] | None = None) -> dict[str, Any]:
    torch.manual_seed(0)
    model = factory().to(device)
    optimizer = _OPTIMIZERS[optimizer_name](model.parameters())
    generator = torch.Generator().manual_seed(1)
    torch.manual_seed(2)  # dropout's: the host's and the device's default generators
    losses = []
    model.train()
    for step in range(STEPS):
        x, y = make_batch(generator, step)
        optimizer.zero_grad()
        out = model(x.to(device))
        loss = loss_fn(out, y.to(device)) if body is None else body(step, out, y.to(device), loss_fn)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return {"losses": losses, "params": _params(model), "state": _state(optimizer)}


@pytest.mark.parametrize("optimizer_name", list(_OPTIMIZERS))
@pytest.mark.parametrize("family", ["mlp", "transformer"])
def test_training_replays_repeated_steps_bit_for_bit(auto_session: Any, family: str, optimizer_name: str) -> None:
    factory, make_batch, loss_fn = {"mlp": (MLP, _mlp_batch, _mlp_loss),
                                    "transformer": (TinyTransformer, _tokens_batch, _token_loss)}[family]
    remote = _train("cuda", factory, optimizer_name, make_batch, loss_fn)
    local = _train("cpu", factory, optimizer_name, make_batch, loss_fn)
    _assert_same(remote, local)
    stats = _stats(auto_session)
    # Steps 0 (ops named for the first time, the optimizer's state made) and 1-3 go op by op;
    # three alike make a template, and the rest replay.
    assert stats["auto_replay_templates"] >= 1, stats
    assert stats["auto_replay_steps"] >= 3, stats


def test_a_divergent_step_goes_op_by_op_and_stays_exact(auto_session: Any) -> None:
    """A branch on the step number (step 5) and a batch of another shape (step 6): those steps
    diverge from the template while the program issues them and go op by op; the rest replay."""

    def batch(generator: torch.Generator, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _mlp_batch(generator, step, rows=24 if step == 6 else 16)

    def body(step: int, out: torch.Tensor, y: torch.Tensor, loss_fn: Any) -> torch.Tensor:
        loss = loss_fn(out, y)
        return loss + 0.1 * out.abs().mean() if step == 5 else loss

    remote = _train("cuda", MLP, "adamw-foreach", batch, _mlp_loss, body)
    local = _train("cpu", MLP, "adamw-foreach", batch, _mlp_loss, body)
    _assert_same(remote, local)
    stats = _stats(auto_session)
    assert stats["auto_replay_fallbacks"] >= 2, stats
    assert stats["auto_replay_fallback_reasons"].get("diverged", 0) >= 2, stats
    assert stats["auto_replay_steps"] >= 1, stats  # step 7 is alike again
    assert "matches no repeated step" in stats["auto_replay_last_fallback"]


def test_data_dependent_control_flow_through_item(auto_session: Any) -> None:
    """``.item()`` inside the step splits it in two streams; which second half runs depends on a
    value read back. Each half is recognised on its own, and both branches stay exact."""

    def run(device: str) -> dict[str, Any]:
        torch.manual_seed(0)
        model = MLP().to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        generator = torch.Generator().manual_seed(3)
        torch.manual_seed(4)
        losses = []
        for _ in range(12):
            x, y = _mlp_batch(generator, 0)
            optimizer.zero_grad()
            out = model(x.to(device))
            if out.mean().item() > 0:  # data-dependent
                loss = F.mse_loss(out, y.to(device))
            else:
                loss = F.l1_loss(out, y.to(device)) * 2
            loss.backward()
            norm = nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append((loss.item(), norm.item()))
        return {"losses": losses, "params": _params(model), "state": _state(optimizer)}

    remote, local = run("cuda"), run("cpu")
    _assert_same(remote, local)
    assert _stats(auto_session)["auto_replay_steps"] >= 3


def test_random_ops_draw_the_default_generators_numbers(auto_session: Any) -> None:
    def run(device: str) -> dict[str, Any]:
        torch.manual_seed(7)
        x = torch.ones(64, 64).to(device)
        results = []
        for _ in range(8):
            y = F.dropout(x, 0.5, training=True) + torch.rand(64, 64, device=device) + torch.randn(8, device=device).sum()
            results.append(y.sum().item())
        return {"losses": results, "params": [y.cpu()]}

    remote, local = run("cuda"), run("cpu")
    _assert_same(remote, local)
    assert _stats(auto_session)["auto_replay_steps"] >= 3


def test_in_place_parameter_updates_by_hand(auto_session: Any) -> None:
    def run(device: str) -> dict[str, Any]:
        torch.manual_seed(0)
        model = MLP().to(device)
        velocity = [torch.zeros_like(p) for p in model.parameters()]
        generator = torch.Generator().manual_seed(5)
        torch.manual_seed(6)
        losses = []
        for _ in range(STEPS):
            x, y = _mlp_batch(generator, 0)
            model.zero_grad(set_to_none=False)
            loss = F.mse_loss(model(x.to(device)), y.to(device))
            loss.backward()
            with torch.no_grad():
                for p, v in zip(model.parameters(), velocity):
                    v.mul_(0.9).add_(p.grad)
                    p.sub_(v, alpha=0.05)
                    p.data.clamp_(-1.0, 1.0)
            losses.append(loss.item())
        return {"losses": losses, "params": _params(model) + [v.cpu() for v in velocity]}

    remote, local = run("cuda"), run("cpu")
    _assert_same(remote, local)
    assert _stats(auto_session)["auto_replay_steps"] >= 3


def test_memory_quota_refuses_a_replayed_step_as_op_by_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each step keeps 1 MiB alive: the steps are alike (a replay from step 4 on), and the one
    that crosses the 12 MiB quota is refused with the same error at the same step as op by op."""
    server = Daemon("--memory-quota", "12MiB")
    try:
        outcomes = {}
        for setting in ("0", "3"):
            monkeypatch.setenv("LIBREMOTE_AUTO_REPLAY", setting)
            with client_connected_to(server.address) as libremote:
                base = torch.ones(256, 1024, device="cuda")
                kept, failure = [], None
                for step in range(20):
                    try:
                        kept.append(base * float(step) + 1)  # (a float: a slot, so the steps are alike)
                        kept[-1].sum().item()
                    except torch.OutOfMemoryError as exc:
                        failure = (step, str(exc).split("\n")[0])
                        break
                stats = libremote.session_stats()
                outcomes[setting] = (failure, stats.get("auto_replay_steps", 0))
                del kept, base
        assert outcomes["0"][0] is not None
        assert outcomes["3"][0] == outcomes["0"][0]
        assert outcomes["3"][1] >= 3  # the step refused was a replayed one
    finally:
        server.stop()


def test_off_by_default(remote: Any, monkeypatch: pytest.MonkeyPatch, daemon: Daemon) -> None:
    from libremote.client import runtime
    from libremote.config import Settings

    monkeypatch.delenv("LIBREMOTE_AUTO_REPLAY", raising=False)
    assert Settings.from_env().auto_replay == 0
    with client_connected_to(daemon.address) as libremote:
        assert runtime.current().steps is None
        assert not any(key.startswith("auto_replay") for key in libremote.session_stats())
    monkeypatch.setenv("LIBREMOTE_AUTO_REPLAY", "5")
    assert Settings.from_env().auto_replay == 5
    monkeypatch.setenv("LIBREMOTE_AUTO_REPLAY", "on")
    assert Settings.from_env().auto_replay == 3


def test_a_template_expands_to_the_commands_it_stands_for() -> None:
    """The client's normalisation and the worker's expansion, through the codec: lossless."""
    from libremote.client.auto_replay import StepTracker
    from libremote_server.worker import repeated_steps
    from libremote_wire import codec
    from libremote_wire.messages import Cmd

    def step(base: int, scale: float) -> list[Any]:
        h = codec.handle_ext
        return [
            [Cmd.OP, 3, [h(5), scale, [h(base), h(base + 1)], True], {"alpha": 1, "out_dtype": None}, [base + 10]],
            [Cmd.UPLOAD, base + 11, "dtype", [4], 1],
            [Cmd.OP, 4, [[h(base + 10), h(5)], [0.5, scale]], {}, [[base + 12, base + 13]]],
            [Cmd.FREE, [base + 10, 99]],
        ]

    tracker = StepTracker(2)
    template = None
    for index in range(3):
        tracker.begin()
        for command in step(100 * (index + 1), 0.25 * index):
            assert tracker.observe(command)
        run, defined = tracker.finish()
        template = template or defined
    assert template is not None and run is not None
    steps: dict[int, Any] = {}
    decoded = codec.unpackb(codec.packb([template, run]))
    expanded = repeated_steps.expand_batch(steps, decoded)
    expected = codec.unpackb(codec.packb(step(300, 0.5)))
    assert _plain_repr(expanded) == _plain_repr(expected)
    # A step that differs in a boolean (True == 1 for Python) or in the dataflow diverges.
    tracker.begin()
    other = step(400, 0.75)
    other[0][2][3] = 1
    assert not tracker.observe(other[0])


def _plain_repr(value: Any) -> Any:
    if isinstance(value, list):
        return [_plain_repr(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain_repr(item) for key, item in value.items()}
    if hasattr(value, "handle"):
        return ("handle", value.handle)
    return (type(value).__name__, value)


def test_a_copy_of_the_same_loop_keeps_replaying(auto_session: Any) -> None:
    """Two models run in turn, each forward ending at its own ``.item()``: both streams replay."""
    torch.manual_seed(0)
    models = [MLP().cuda(), copy.deepcopy(MLP()).cuda()]
    x = torch.randn(16, 12).cuda()
    for _ in range(8):
        for model in models:
            model(x).sum().item()
    stats = _stats(auto_session)
    assert stats["auto_replay_templates"] >= 1 and stats["auto_replay_steps"] >= 4, stats


def test_an_op_error_in_a_replayed_step_surfaces_as_op_by_op(auto_session: Any, daemon: Daemon,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The same step, with an index out of range in its data on step 6: the error comes at the
    same sync point, with the same message, whether the step was replayed or not."""
    from libremote.errors import LibremoteError

    def run() -> list[Any]:
        table = torch.arange(40.0).reshape(10, 4).cuda()
        outcomes: list[Any] = []
        for step in range(8):
            index = torch.tensor([1, 2, 12 if step == 6 else 3]).cuda()
            try:
                outcomes.append(table[index].sum().item())
            except (LibremoteError, RuntimeError, IndexError) as exc:
                outcomes.append(str(exc).split("\n")[0])
        return outcomes

    replayed = run()
    assert isinstance(replayed[6], str) and all(isinstance(value, float) for i, value in enumerate(replayed) if i != 6)
    assert _stats(auto_session)["auto_replay_steps"] >= 4  # steps 4 to 7: the failing one too
    monkeypatch.setenv("LIBREMOTE_AUTO_REPLAY", "0")
    with client_connected_to(daemon.address):
        assert run() == replayed


def test_replayed_steps_through_spills(monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon that spills to host memory (``--device-memory``): replayed steps stay exact."""
    server = Daemon("--device-memory", "64MiB", "--host-spill", "256MiB")
    try:
        monkeypatch.setenv("LIBREMOTE_AUTO_REPLAY", "3")
        with client_connected_to(server.address) as libremote:
            remote = _train("cuda", MLP, "adamw-foreach", _mlp_batch, _mlp_loss)
            stats = _stats(libremote)
        local = _train("cpu", MLP, "adamw-foreach", _mlp_batch, _mlp_loss)
        _assert_same(remote, local)
        assert stats["auto_replay_steps"] >= 3, stats
    finally:
        server.stop()
