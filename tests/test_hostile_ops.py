"""Allowed ops paired with hostile tensors, CI-sized: a few hundred calls from tests/hostile_ops.py
against a real daemon, while another tenant holds a secret.

A call may succeed, fail with an error, or end the worker of the tenant that sent it ("fuzz"): a
kernel that trusted its arguments. Worker deaths are counted and printed, not failed (each one a
campaign finds becomes an op rule with its test in tests/test_findings.py; scripts/fuzz_ops.py is
the long run). What must hold: every call is answered, the front never dies, and the other
tenant's worker stays the same process, with its secret intact and its results exact. The calls
that crashed workers before their rules (hostile_ops.KNOWN_CRASHES) run last: refused with the
rules, ending their own worker without.
"""

from __future__ import annotations

import random
import time

import pytest
import torch

import hostile_ops
from conftest import Daemon

TENANTS = """
[tenants.alice]
token = "alice-secret"
memory_quota = "256MiB"

[tenants.fuzz]
token = "fuzz-secret"
memory_quota = "256MiB"
"""
#: The daemon's --op-time-limit: past a fresh worker's first Python meta kernel (2-4 s of imports
#: on the 2-core VM), a kernel this slow has hung.
OP_TIME_LIMIT_S = 10
#: Calls in the campaign: random overloads (seeded), then each op issue 19 found.
CALLS = 300
FINDINGS = ["aten::_cdist_backward", "aten::_fused_sgd_", "aten::_fused_adagrad_", "aten::embedding_backward",
            "aten::ctc_loss.IntList", "aten::segment_reduce", "aten::_weight_norm_interface_backward",
            "aten::repeat_interleave.self_Tensor", "aten::_ctc_loss", "aten::_logcumsumexp.out"]


@pytest.mark.parametrize("rules", [(), ("--unsafe-no-op-rules",)], ids=["rules on", "rules off"])
def test_hostile_calls_of_allowed_ops_end_at_most_their_own_worker(tmp_path, rules):
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(TENANTS)
    # The bystander sends nothing while the campaign runs: its session must outlive the heartbeat
    # timeout. The op time limit ends a worker whose kernel hangs (heap corruption ends so).
    server = Daemon("--tenants", str(tenants), "--op-time-limit", str(OP_TIME_LIMIT_S), "--heartbeat-timeout", "3600", *rules)
    clients: list = []
    try:
        alice = hostile_ops.Bystander(server.address, "alice", "alice-secret")
        clients.append(alice)
        allowed = hostile_ops.allowed_overloads()
        names = random.Random(0).sample(allowed, CALLS - 2 * len(FINDINGS)) + FINDINGS * 2
        fuzzer = hostile_ops.OpFuzzer(server.address, "fuzz", "fuzz-secret", answer_wait_s=OP_TIME_LIMIT_S + 30,
                                      warm_up=False)  # (a fresh worker's imports fit in the time limit)
        clients.append(fuzzer)
        started = time.monotonic()
        tally = hostile_ops.campaign(fuzzer, hostile_ops.HostileCalls(seed=0, names=allowed), len(names), names=names)
        known = hostile_ops.Tally()
        for call in hostile_ops.KNOWN_CRASHES:
            known.add(call, fuzzer.run(call))
        print(f"\n{time.monotonic() - started:.1f} s, {fuzzer.sessions} sessions of tenant fuzz\n{tally.summary()}"
              f"\nknown crashes: {known.summary()}")
        assert tally.total == CALLS
        lost = known.counts[hostile_ops.CRASH] + known.counts[hostile_ops.TIME_LIMIT]
        if rules:  # without the rules, each kernel runs and (most) end their worker: counted, not failed
            assert lost > 0, known.summary()
        else:  # with them, each is refused
            assert known.counts[hostile_ops.ERROR] == len(hostile_ops.KNOWN_CRASHES), known.summary()
        assert hostile_ops.NO_ANSWER not in tally.counts, tally.summary()  # the front always said why
        assert server.process.poll() is None, f"the front died:\n{server.log()[-3000:]}"
        assert alice.problems() == []
        # The tenant that lost workers gets a fresh one that computes.
        after = hostile_ops.OpFuzzer(server.address, "fuzz", "fuzz-secret")
        clients.append(after)
        three = hostile_ops.TensorSpec(torch.float32, (3,))
        assert after.run(hostile_ops.Call("aten::add.Tensor", [three, three], {})).kind == hostile_ops.OK
    finally:
        for client in clients:
            client.close()
        server.stop()
