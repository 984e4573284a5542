"""Issue 19's findings, each a regression test: a hostile tenant's raw-client repro against a daemon
that serves another tenant too.

Bob (a tenant of the tenants file, with a raw pyzmq client: tests/raw_client.py) sends what the
libremote client never would: an aten op whose kernel trusts arguments bob chose. Alice, another
tenant, holds a secret in her own worker. Every finding runs twice:

* **rules on**: the op is refused with the reason (an op rule: server/worker/call_checks.py, the
  ``index_checked`` composites of server/worker/op_rules.py), or its result is made safe
  (server/worker/zeroing.py); the honest call of the same op still computes exactly what local
  torch computes, and bob's session goes on.
* **rules off** (``--unsafe-no-op-rules``, tests only): the kernel runs unchecked. Bob gets an
  error, bytes of his own process, or loses his worker (his next session gets a fresh one): the
  process boundary alone keeps alice safe.

Either way the front serves, and alice's secret is intact in the same worker, which keeps
computing exact results. Each rules-on case fails on the code before its rule (the commit that
added the rule says how it was checked).
"""

from __future__ import annotations

import os
import signal
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from libremote_wire import codec
from libremote_wire.messages import Cmd, Msg

from conftest import Daemon
from helpers import wait_for_log
from hostile_ops import await_reply
from isolation_helpers import TENANTS, hello_as, holds_secret, put_secret
from raw_client import RawClient

#: The daemons' --op-time-limit: heap corruption often ends in a kernel waiting forever on
#: malloc's lock; the limit ends that worker (bob's) instead.
OP_TIME_LIMIT_S = 3
#: How long bob waits for an answer or the front's word that his worker ended.
ANSWER_WAIT_S = OP_TIME_LIMIT_S + 30
RULES = {"on": (), "off": ("--unsafe-no-op-rules",)}
h = codec.handle_ext


# ------------------------------------------------------------------------------------------------
# Daemons, tenants, and what bob's attempt came to
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def _daemons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One daemon per rules mode for the module, started when first needed."""
    path = tmp_path_factory.mktemp("findings") / "tenants.toml"
    path.write_text(TENANTS)
    holder: dict[str, Any] = {"tenants": path}
    yield holder
    for mode in RULES:
        if mode in holder:
            holder[mode].stop()


@pytest.fixture(params=list(RULES))
def rules(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def server(_daemons: dict[str, Any], rules: str) -> Daemon:
    """This mode's daemon; a fresh one if a test before killed its front (that test failed on
    it; the next one tests its own finding)."""
    daemon = _daemons.get(rules)
    if daemon is None or daemon.process.poll() is not None:
        if daemon is not None:
            daemon.stop()
        daemon = _daemons[rules] = Daemon("--tenants", str(_daemons["tenants"]),
                                          "--op-time-limit", str(OP_TIME_LIMIT_S), *RULES[rules])
    return daemon


@dataclass
class Attempt:
    """What bob's op came to: "refused" or "error" (with the message), "result" (with the frames
    of what he fetched), or "lost" (his worker ended: the front's word why)."""

    kind: str
    message: str = ""
    frames: list[bytes] = field(default_factory=list)


@dataclass
class Tenants:
    server: Daemon
    rules: str
    alice: RawClient
    bob: RawClient
    alice_worker: int
    bob_worker: int

    def attempt(self, commands: list[Any]) -> Attempt:
        """Bob sends ``commands`` (an op, then maybe a FETCH) in one batch."""
        how, answer, frames = await_reply(self.bob, self.bob.batch(commands), ANSWER_WAIT_S)
        if how == "lost":
            return Attempt("lost", answer)
        assert how == "reply", f"bob's worker neither answered nor ended: {answer}\n{self.server.log()[-3000:]}"
        error = answer[3]
        if error is not None:
            return Attempt("refused" if error[0] == "refused" else "error", error[2])
        return Attempt("result", frames=frames)

    def check(self, attempt: Attempt, *words: str) -> None:
        """What each mode promises of bob's attempt, then that alice is unaffected."""
        if self.rules == "on":
            assert attempt.kind == "refused", attempt
            for word in words:
                assert word in attempt.message, (word, attempt.message)
            bob_computes(self.bob)  # his session goes on
        else:
            for frame in attempt.frames:
                assert holds_secret(bytes(frame)) == 0, "bob read alice's secret"
            if attempt.kind == "lost":  # his loss alone: his next session runs in a fresh worker
                with RawClient(self.server.address) as again:
                    assert hello_as(again, "bob")["pid"] != self.bob_worker
                    bob_computes(again)
        alice_unaffected(self)


def bob_computes(client: RawClient) -> None:
    client.put(901, torch.tensor([1.5, 2.5]))
    _, error, _ = client.call([[Cmd.OP_SYNC, [900, "aten::mul.Tensor"], [h(901), h(901)], {}, [902]]])
    assert error is None, error
    assert client.fetch(902).tolist() == [2.25, 6.25]


def alice_unaffected(tenants: Tenants) -> None:
    """The front serves; alice's worker is the one she started in; her secret is intact; she
    computes exactly what local torch computes."""
    server, alice = tenants.server, tenants.alice
    assert server.process.poll() is None, f"the front died:\n{server.log()[-3000:]}"
    assert holds_secret(bytes(alice.fetch(1).numpy().tobytes())) == 8192
    a = torch.arange(-12.0, 12.0).reshape(4, 6)
    alice.put(2, a)
    _, error, _ = alice.call([[Cmd.OP_SYNC, [801, "aten::t"], [h(2)], {}, [4]],
                              [Cmd.OP_SYNC, [800, "aten::mm"], [h(2), h(4)], {}, [5]]])
    assert error is None, error
    assert alice.fetch(5).equal(a @ a.t())
    alice.call([[Cmd.FREE, [2, 4, 5]]])
    with RawClient(server.address) as again:  # her worker is the one she started in
        assert hello_as(again, "alice")["pid"] == tenants.alice_worker


@pytest.fixture
def tenants(server: Daemon, rules: str) -> Iterator[Tenants]:
    with RawClient(server.address) as alice, RawClient(server.address) as bob:
        alice_worker = hello_as(alice, "alice")["pid"]
        put_secret(alice)
        bob_worker = hello_as(bob, "bob")["pid"]
        assert alice_worker != bob_worker
        yield Tenants(server, rules, alice, bob, alice_worker, bob_worker)
    if rules == "off":
        _end_worker(server, bob_worker, "bob")


def _end_worker(server: Daemon, pid: int, tenant: str) -> None:
    """End a worker that ran kernels unchecked (rules off: one may have corrupted its heap
    without crashing it yet), and wait until the front knows: the next test starts afresh."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # (it died of what bob did)
    wait_for_log(server, f"(pid {pid}, {tenant}) ended", timeout=30)


def op(op_id: int, name: str, args: list[Any], kwargs: dict[str, Any] | None = None, outs: list[Any] | None = None) -> list[Any]:
    return [Cmd.OP_SYNC, [op_id, name], args, kwargs or {}, outs if outs is not None else [None]]


def honest(tenants: Tenants, puts: dict[int, torch.Tensor], command: list[Any], fetched: int,
           expected: torch.Tensor) -> None:
    """With the rules on, the honest call of the op runs and computes what local torch computes
    (the check is per call, not a refusal of the op)."""
    if tenants.rules != "on":
        return
    for handle, tensor in puts.items():
        tenants.bob.put(handle, tensor)
    _, error, _ = tenants.bob.call([command])
    assert error is None, error
    got = tenants.bob.fetch(fetched)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(got, expected) or torch.allclose(got, expected, rtol=0, atol=0, equal_nan=True), (got, expected)


# ------------------------------------------------------------------------------------------------
# The findings
# ------------------------------------------------------------------------------------------------
def test_cdist_backward_checks_the_gradients_shape(tenants):
    """``_cdist_backward(g, ones([2**20, 1]), zeros([1, 1]), 1.0, ones([1, 1]))`` with a
    1-element ``g`` read 4 MiB past it: bob FETCHed another tenant's freed secret and heap
    pointers. Rule: ``grad`` and ``cdist`` must be ``[r1, r2]``."""
    bob = tenants.bob
    bob.put(1, torch.ones(1))
    bob.put(2, torch.ones(1 << 20, 1))
    bob.put(3, torch.zeros(1, 1))
    bob.put(4, torch.ones(1, 1))
    attempt = tenants.attempt([op(1, "aten::_cdist_backward", [h(1), h(2), h(3), 1.0, h(4)], outs=[5]), [Cmd.FETCH, 5]])
    tenants.check(attempt, "'grad'", "[1048576, 1]")
    x1, x2 = torch.arange(10.0).reshape(5, 2), torch.arange(6.0).reshape(3, 2) / 3
    cdist = torch.cdist(x1, x2, p=1.0)
    grad = torch.arange(15.0).reshape(5, 3)
    honest(tenants, {11: grad, 12: x1, 13: x2, 14: cdist},
           op(2, "aten::_cdist_backward", [h(11), h(12), h(13), 1.0, h(14)], outs=[15]), 15,
           torch.ops.aten._cdist_backward(grad, x1, x2, 1.0, cdist))


SGD = dict(weight_decay=0.0, momentum=0.9, lr=0.1, dampening=0.0, nesterov=False, maximize=False, is_first_step=False)
ADAGRAD = dict(lr=0.1, lr_decay=0.0, weight_decay=0.0, eps=1e-10, maximize=False)


def test_fused_sgd_checks_its_momentum_buffers(tenants):
    """``_fused_sgd_`` with a 1-element momentum buffer for 65,536 parameters wrote 256 KiB past
    it (the worker hung on malloc's lock, or crashed). Rule: every per-parameter tensor has its
    parameter's shape, dtype and layout."""
    bob = tenants.bob
    bob.put(1, torch.ones(1 << 16))
    bob.put(2, torch.ones(1 << 16))
    bob.put(3, torch.ones(1))
    attempt = tenants.attempt([op(1, "aten::_fused_sgd_", [[h(1)], [h(2)], [h(3)]], SGD, outs=[]), [Cmd.FETCH, 1]])
    tenants.check(attempt, "'momentum_buffer_list'[0]")
    params, grads, momentum = torch.arange(8.0), torch.arange(8.0) / 4, torch.ones(8)
    expected = params.clone()
    torch.ops.aten._fused_sgd_([expected], [grads.clone()], [momentum.clone()], **SGD)
    honest(tenants, {11: params, 12: grads, 13: momentum},
           op(2, "aten::_fused_sgd_", [[h(11)], [h(12)], [h(13)]], SGD, outs=[]), 11, expected)


def test_fused_adagrad_checks_its_state_sums(tenants):
    """``_fused_adagrad_`` with a 1-element ``state_sums`` likewise. Same rule."""
    bob = tenants.bob
    bob.put(1, torch.ones(1 << 16))
    bob.put(2, torch.ones(1 << 16))
    bob.put(3, torch.ones(1))
    bob.put(4, torch.zeros(()))
    attempt = tenants.attempt([op(1, "aten::_fused_adagrad_", [[h(1)], [h(2)], [h(3)], [h(4)]], ADAGRAD, outs=[]),
                               [Cmd.FETCH, 1]])
    tenants.check(attempt, "'state_sums'[0]")
    params, grads, sums, step = torch.arange(8.0), torch.arange(8.0) / 4, torch.ones(8), torch.zeros(())
    expected = params.clone()
    torch.ops.aten._fused_adagrad_([expected], [grads.clone()], [sums.clone()], [step.clone()], **ADAGRAD)
    honest(tenants, {11: params, 12: grads, 13: sums, 14: step},
           op(2, "aten::_fused_adagrad_", [[h(11)], [h(12)], [h(13)], [h(14)]], ADAGRAD, outs=[]), 11, expected)


def test_embedding_backward_checks_its_indices_like_the_kernel_it_wraps(tenants):
    """``embedding_backward`` with indices ``[2**40, -2**40]`` and ``scale_grad_by_freq``
    crashed the daemon: the index check was keyed on the inner ``embedding_dense_backward``,
    which the composite calls past the daemon. Rule: its indices are range-checked too."""
    bob = tenants.bob
    bob.put(1, torch.ones(2, 3))
    bob.put(2, torch.tensor([2**40, -(2**40)]))
    attempt = tenants.attempt([op(1, "aten::embedding_backward", [h(1), h(2), 4, -1, True, False], outs=[3]),
                               [Cmd.FETCH, 3]])
    tenants.check(attempt, "'indices'", "1099511627776")
    grad, indices = torch.arange(6.0).reshape(2, 3), torch.tensor([1, 3])
    honest(tenants, {11: grad, 12: indices}, op(2, "aten::embedding_backward", [h(11), h(12), 4, -1, True, False], outs=[13]),
           13, torch.ops.aten.embedding_backward(grad, indices, 4, -1, True, False))


def _log_probs(steps: int = 5, batch: int = 1, classes: int = 4) -> torch.Tensor:
    return torch.linspace(-3, 3, steps * batch * classes).reshape(steps, batch, classes).log_softmax(2)


def test_ctc_loss_checks_its_targets_like_the_kernel_it_wraps(tenants):
    """``ctc_loss.IntList`` with a target of 2**40 (the same bypass: the check was on
    ``_ctc_loss``). Rule: its targets are range-checked too."""
    bob = tenants.bob
    bob.put(1, _log_probs())
    bob.put(2, torch.tensor([[2**40]]))
    attempt = tenants.attempt([op(1, "aten::ctc_loss.IntList", [h(1), h(2), [5], [1]], outs=[3]), [Cmd.FETCH, 3]])
    tenants.check(attempt, "'targets'", "1099511627776")
    log_probs, targets = _log_probs(), torch.tensor([[2]])
    honest(tenants, {11: log_probs, 12: targets}, op(2, "aten::ctc_loss.IntList", [h(11), h(12), [5], [1]], outs=[13]),
           13, torch.ops.aten.ctc_loss.IntList(log_probs, targets, [5], [1]))


def test_segment_reduce_checks_its_offsets(tenants):
    """``segment_reduce`` with offsets ``[0, 2**30]`` read 4 GiB past a 4-element tensor (the
    kernel checks lengths, never offsets). Rule: offsets rise from 0 to at most the data's size,
    one row per outer index."""
    bob = tenants.bob
    bob.put(1, torch.ones(4))
    bob.put(2, torch.tensor([0, 2**30]))
    attempt = tenants.attempt([op(1, "aten::segment_reduce", [h(1), "sum"], {"offsets": h(2)}, outs=[3]), [Cmd.FETCH, 3]])
    tenants.check(attempt, "'offsets'", "1073741824")
    data, offsets = torch.arange(1.0, 5.0), torch.tensor([0, 1, 4])
    honest(tenants, {11: data, 12: offsets}, op(2, "aten::segment_reduce", [h(11), "sum"], {"offsets": h(12)}, outs=[13]),
           13, torch.ops.aten.segment_reduce(data, "sum", offsets=offsets))


def test_weight_norm_backward_checks_its_saved_tensors(tenants):
    """``_weight_norm_interface_backward`` with a 1-element ``saved_g`` and ``saved_norms`` for
    1,024 norms wrote ``grad_g`` (made like ``saved_g``) 4 KiB past its end: heap corruption.
    Rule: the saved tensors and ``grad_w`` fit ``saved_v``."""
    bob = tenants.bob
    bob.put(1, torch.ones(1024, 1024))
    bob.put(2, torch.ones(1))
    attempt = tenants.attempt([op(1, "aten::_weight_norm_interface_backward", [h(1), h(1), h(2), h(2), 0], outs=[3, 4]),
                               [Cmd.FETCH, 4]])
    tenants.check(attempt, "'saved_g'", "1024 norms")
    v, g = torch.arange(12.0).reshape(4, 3) - 5, torch.arange(1.0, 5.0).reshape(4, 1)
    _, norms = torch.ops.aten._weight_norm_interface(v, g, 0)
    grad_w = torch.ones(4, 3)
    honest(tenants, {11: grad_w, 12: v, 13: g, 14: norms},
           op(2, "aten::_weight_norm_interface_backward", [h(11), h(12), h(13), h(14), 0], outs=[15, 16]), 15,
           torch.ops.aten._weight_norm_interface_backward(grad_w, v, g, norms, 0)[0])


def test_repeat_interleave_checks_its_repeats_against_output_size(tenants):
    """``repeat_interleave.self_Tensor`` with repeats ``[-5, 10]`` and ``output_size=5`` wrote
    before its result (``free(): invalid pointer``). Rule: repeats are non-negative and add up to
    ``output_size``."""
    bob = tenants.bob
    bob.put(1, torch.ones(2))
    bob.put(2, torch.tensor([-5, 10]))
    attempt = tenants.attempt([op(1, "aten::repeat_interleave.self_Tensor", [h(1), h(2), 0], {"output_size": 5}, outs=[3]),
                               [Cmd.FETCH, 3]])
    tenants.check(attempt, "'repeats'", "negative")
    values, repeats = torch.tensor([1.5, -2.0]), torch.tensor([2, 3])
    honest(tenants, {11: values, 12: repeats},
           op(2, "aten::repeat_interleave.self_Tensor", [h(11), h(12), 0], {"output_size": 5}, outs=[13]), 13,
           torch.repeat_interleave(values, repeats, 0, output_size=5))


#: A 4-byte pattern bob's first session leaves in freed memory.
PATTERN = 0x7A7A7A7A


def test_ctc_loss_log_alpha_holds_no_stale_memory(tenants):
    """``_ctc_loss`` returns ``log_alpha`` from ``empty``; the CPU kernel writes only the time
    steps below each input length: bob read back 127,559 copies of a freed 2 MiB pattern. Now
    the rest is -inf, as the CUDA kernel leaves it (server/worker/zeroing.py): no stale bytes of a
    previous session of bob's own (same worker), none of alice's (the process boundary), with
    the rules on or off (the zeroing is no op rule)."""
    bob = tenants.bob
    for handle in range(10, 14):  # bob's first session leaves 8 MiB of his pattern freed
        bob.put(handle, torch.full((1 << 19,), PATTERN, dtype=torch.int32))
    bob.call([[Cmd.FREE, list(range(10, 14))]])
    bob.send([Msg.BYE])
    with RawClient(tenants.server.address) as again:
        assert hello_as(again, "bob")["pid"] == tenants.bob_worker  # his second session: the same worker
        again.put(1, _log_probs(steps=1024))
        again.put(2, torch.ones(1, 256, dtype=torch.int64))
        _, error, frames = again.call([op(1, "aten::_ctc_loss", [h(1), h(2), [1], [256]], outs=[3, 4]), [Cmd.FETCH, 4]])
        assert error is None, error
        fetched = bytes(frames[0])
        assert len(fetched) == 1024 * 513 * 4
        assert fetched.count(struct.pack("<i", PATTERN)) == 0, "bob read his previous session's freed memory"
        assert holds_secret(fetched) == 0
        log_alpha = torch.frombuffer(bytearray(fetched), dtype=torch.float32).reshape(1, 1024, 513)
        expected = torch.ops.aten._ctc_loss(_log_probs(steps=1024), torch.ones(1, 256, dtype=torch.int64), [1], [256])[1]
        assert torch.equal(log_alpha[:, 0], expected[:, 0])  # the row the kernel writes
        assert bool((log_alpha[:, 1:] == -torch.inf).all())  # the rest, as CUDA leaves it
    alice_unaffected(tenants)


def test_logcumsumexp_out_checks_its_out_dtype(tenants):
    """Found by scripts/fuzz_ops.py: ``_logcumsumexp.out`` resizes an int8 ``out`` to the
    input's shape and writes the input's floats into it (4 bytes per 1-byte element: glibc's
    checking malloc reported "corrupted size vs. prev_size"). Rule: ``out`` has ``self``'s dtype."""
    bob = tenants.bob
    bob.put(1, torch.linspace(-2, 2, 1 << 16).reshape(1 << 8, 1 << 8))
    bob.put(2, torch.zeros(1, dtype=torch.int8))
    attempt = tenants.attempt([op(1, "aten::_logcumsumexp.out", [h(1), -2], {"out": h(2)}, outs=[None]), [Cmd.FETCH, 2]])
    tenants.check(attempt, "'out'", "torch.int8")
    values = torch.linspace(-2, 2, 12).reshape(3, 4)
    honest(tenants, {11: values, 12: torch.zeros(0)},
           op(2, "aten::_logcumsumexp.out", [h(11), -2], {"out": h(12)}, outs=[None]), 12,
           torch.ops.aten._logcumsumexp(values, -2))


# ------------------------------------------------------------------------------------------------
# Found by scripts/fuzz_ops.py (allowed ops paired with hostile tensors, op rules on)
# ------------------------------------------------------------------------------------------------
def _wire(bob: RawClient, value: Any, handles: list[int], first: int = 50) -> Any:
    """``value`` with its tensors PUT at fresh handles (from ``first``) and replaced by references."""
    if isinstance(value, dict):
        return {key: _wire(bob, item, handles, first) for key, item in value.items()}
    if isinstance(value, torch.Tensor):
        handle = first + len(handles)
        bob.put(handle, value)
        handles.append(handle)
        if value.stride() == (0,) * value.dim() and value.numel() > 1:  # an expanded view: made in the worker
            bob.call([[Cmd.FREE, [handle]]])
            bob.put(handle + 100, value.reshape(-1)[:1].clone())
            bob.call([op(700, "aten::expand", [h(handle + 100), list(value.shape)], outs=[handle])])
        return h(handle)
    if isinstance(value, list):
        return [_wire(bob, item, handles, first) for item in value]
    return value


def _z(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.linspace(-2, 2, max(1, torch.Size(shape).numel()))[:torch.Size(shape).numel()].reshape(shape).to(dtype)


#: (op, hostile args, hostile kwargs, words of the refusal, honest args, honest kwargs), each a
#: crash of the fuzzing tenant's worker in a campaign with the rules on, shrunk to its cause.
FUZZ_FINDINGS = [
    ("aten::_stack", [[], 0], {}, ("'tensors'",), [[_z(2, 3), _z(2, 3) * 2], 1], {}),
    ("aten::_foreach_copy", [[_z(2)], [_z(2), _z(2), _z(2), _z(2)]], {}, ("'src'", "one each"),
     [[_z(2), _z(3)], [_z(2) * 3, _z(3) * 3]], {}),
    ("aten::reflection_pad1d_backward", [_z(2, 3, 4), _z(2, 3, 4), []], {}, ("'padding'", "must hold 2"),
     [_z(2, 3, 6), _z(2, 3, 4), [1, 1]], {}),
    ("aten::reflection_pad2d_backward", [_z(2, 3, 4, 5), _z(2, 3, 4, 5), []], {}, ("'padding'", "must hold 4"),
     [_z(2, 3, 6, 7), _z(2, 3, 4, 5), [1, 1, 1, 1]], {}),
    ("aten::replication_pad2d_backward.grad_input", [_z(2, 3, 6, 7), _z(2, 3, 4, 5), [1, 1, 1, 1]],
     {"grad_input": torch.ones(1).expand(2, 3, 4, 5)}, ("'grad_input'", "overlaps itself"),
     [_z(2, 3, 6, 7), _z(2, 3, 4, 5), [1, 1, 1, 1]], {"grad_input": torch.zeros(2, 3, 4, 5)}),
    ("aten::fractional_max_pool2d_backward", [_z(2, 3, 2, 2), _z(2, 3, 4, 5), [2, 2], [], torch.zeros(2, 3, 2, 2, dtype=torch.int64)],
     {}, ("'output_size'", "must hold 2"),
     [_z(2, 3, 2, 2), _z(2, 3, 4, 5), [2, 2], [2, 2], torch.tensor([0, 7, 12, 19]).repeat(2, 3, 1).reshape(2, 3, 2, 2)], {}),
    ("aten::_slow_conv2d_backward.grad_input", [_z(2, 3, 4, 5), _z(2, 3, 4, 5), _z(3, 3, 1, 1), [1, 1], [1, 1], []],
     {"grad_input": torch.zeros(0), "grad_weight": torch.zeros(0), "grad_bias": torch.zeros(0)}, ("'padding'", "must hold 2"),
     [_z(2, 3, 4, 5), _z(2, 3, 4, 5), _z(3, 3, 1, 1), [1, 1], [1, 1], [0, 0]],
     {"grad_input": torch.zeros(0), "grad_weight": torch.zeros(0), "grad_bias": torch.zeros(0)}),
    # (No honest call: NNPACK does not run on the test machine's CPU.)
    ("aten::_nnpack_spatial_convolution", [_z(2, 3, 4, 5).to(torch.complex64), _z(5, 5), _z(256, 1024).half().t(), [2], []],
     {}, ("'padding'", "must hold 2"), None, None),
    ("aten::_weight_norm_interface", [torch.zeros(0), _z(2, 2, 2, 2, 2)], {}, ("no elements along dim 0",),
     [_z(4, 3), _z(4, 1)], {}),
]


@pytest.mark.parametrize("name, args, kwargs, words, honest_args, honest_kwargs", FUZZ_FINDINGS,
                         ids=[finding[0].removeprefix("aten::") for finding in FUZZ_FINDINGS])
def test_a_crash_the_fuzzer_found_is_refused(tenants, name, args, kwargs, words, honest_args, honest_kwargs):
    """With the rules on, refused (and the honest call computes what local torch computes);
    without them, the kernel runs: bob's worker may die, alice's never does."""
    overload = _overload(name)
    returns = len(overload._schema.returns)
    handles: list[int] = []
    wired = _wire(tenants.bob, [args, kwargs], handles)
    tenants.check(tenants.attempt([op(1, name, wired[0], wired[1], outs=[None] * returns)]), *words)
    if tenants.rules != "on" or honest_args is None:
        return
    expected = overload(*honest_args, **{key: value.clone() for key, value in honest_kwargs.items()})
    expected = list(expected) if isinstance(expected, tuple) else [expected]
    outs: list[Any] = []
    for index, value in enumerate(expected):  # a handle per result, a list of them for a list
        outs.append(list(range(600 + 10 * index, 600 + 10 * index + len(value))) if isinstance(value, list) else 600 + 10 * index)
    wired = _wire(tenants.bob, [honest_args, honest_kwargs], [], first=300)
    _, error, _ = tenants.bob.call([op(2, name, wired[0], wired[1], outs=outs)])
    assert error is None, error
    for out, value in zip(outs, expected):
        for handle, tensor in zip(out if isinstance(out, list) else [out], value if isinstance(value, list) else [value]):
            assert torch.equal(tenants.bob.fetch(handle), tensor), (name, handle)


def _overload(name: str) -> Any:
    op_name, _, overload = name.removeprefix("aten::").partition(".")
    return getattr(getattr(torch.ops.aten, op_name), overload or "default")


# ------------------------------------------------------------------------------------------------
# Over the whole registry (no daemon)
# ------------------------------------------------------------------------------------------------
def test_every_allowed_overload_of_a_checked_op_runs_its_check():
    """A call check (server/worker/call_checks.py) is added to whichever rule allowed the op, for
    every overload (``.out``, ``.grad_input``, functional and in-place forms alike), and every
    ``out=`` tensor is checked not to overlap itself."""
    from libremote_server.worker import call_checks, op_policy

    checked, outs = set(), 0
    for name in sorted(torch._C._dispatch_get_all_op_names()):
        if not name.startswith("aten::"):
            continue
        try:
            entry = op_policy.resolve(name)
        except op_policy.OpRefused:
            continue
        schema = entry.overload._schema
        if call_checks.check_for(schema) is not None:
            assert entry.check_arguments is not None, name
            checked.add(schema.name)
        if any(a.kwarg_only and a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
            assert entry.check_arguments is not None, name
            outs += 1
    assert {f"aten::{op}" for op in call_checks.CHECKS} <= checked
    assert "aten::_foreach_copy" in checked and "aten::reflection_pad2d_backward" in checked
    assert outs > 500


@pytest.mark.parametrize("name, args, kwargs", [
    ("aten::_cdist_backward", [torch.ones(1), torch.ones(5, 2), torch.ones(3, 2), 1.0, torch.ones(1)], {}),
    ("aten::segment_reduce", [torch.ones(2, 4), "sum"], {"offsets": torch.tensor([0, 4]), "axis": 1}),  # a row short
    ("aten::segment_reduce", [torch.ones(4), "sum"], {"offsets": torch.tensor([0, 3, 2])}),  # decreasing
    ("aten::segment_reduce", [torch.ones(4), "sum"], {"lengths": torch.tensor([1, 5])}),
    ("aten::repeat_interleave.Tensor", [torch.tensor([2, 3])], {"output_size": 4}),
    ("aten::repeat_interleave.self_int", [torch.ones(2, 3), 2, 1], {"output_size": 5}),
    ("aten::_fused_adam_", [[torch.ones(4)], [torch.ones(4)], [torch.ones(4)], [torch.ones(4)], [], [torch.ones(2)]],
     dict(lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)),
    ("aten::_fused_sgd_", [[torch.ones(4, 2)], [torch.ones(2, 4).t()], []],
     dict(weight_decay=0.0, momentum=0.0, lr=0.1, dampening=0.0, nesterov=False, maximize=False, is_first_step=False)),
    ("aten::_weight_norm_interface", [torch.ones(4, 3).t(), torch.ones(3)], {"dim": 0}),
    ("aten::_ctc_loss_backward", [torch.ones(1), _log_probs(), torch.tensor([[1, 2]]), [5], [2], torch.ones(1),
                                  torch.ones(1, 5, 3), 0], {}),  # log_alpha too narrow for 2 targets
    ("aten::_ctc_loss_backward", [torch.ones(1), _log_probs(), torch.tensor([[1, 2]]), [9], [2], torch.ones(1),
                                  torch.ones(1, 5, 5), 0], {}),  # an input longer than log_probs
    ("aten::_foreach_add.List", [[torch.ones(2)], [torch.ones(2), torch.ones(2)]], {}),
    ("aten::add.out", [torch.ones(3), torch.ones(3)], {"out": torch.ones(1).expand(3)}),
])
def test_call_checks_refuse_arguments_their_kernels_would_trust(name, args, kwargs):
    """More of what the checks refuse, beside the findings above (no daemon: the check alone)."""
    from libremote_server.worker import op_policy

    with pytest.raises(op_policy.ArgumentRefused):
        op_policy.resolve(name).check_arguments(args, kwargs, [torch.device("cpu")])
