"""Allowed ops paired with hostile tensors, CI-sized: a few hundred calls from tests/hostile_ops.py
against a real daemon, while another tenant holds a secret.

A call may succeed, fail with an error, or end the worker of the tenant that sent it ("fuzz"): a
kernel that trusted its arguments. Worker deaths are counted and printed, not failed (each one a
campaign finds becomes an op rule with its test in tests/test_findings.py; scripts/fuzz_ops.py is
the long run). What must hold: every call is answered, the front never dies, and the other
tenant's worker stays the same process, with its secret intact and its results exact.
"""

from __future__ import annotations

import random
import time

import pytest

from conftest import Daemon
import hostile_ops

TENANTS = """
[tenants.alice]
token = "alice-secret"
memory_quota = "256MiB"

[tenants.fuzz]
token = "fuzz-secret"
memory_quota = "256MiB"
"""
#: Calls in the campaign: random overloads (seeded), then each op issue 19 found.
CALLS = 300
FINDINGS = ["aten::_cdist_backward", "aten::_fused_sgd_", "aten::_fused_adagrad_", "aten::embedding_backward",
            "aten::ctc_loss.IntList", "aten::segment_reduce", "aten::_weight_norm_interface_backward",
            "aten::repeat_interleave.self_Tensor", "aten::_ctc_loss", "aten::_logcumsumexp.out"]


@pytest.mark.parametrize("rules", [(), ("--unsafe-no-op-rules",)], ids=["rules on", "rules off"])
def test_hostile_calls_of_allowed_ops_end_at_most_their_own_worker(tmp_path, rules):
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(TENANTS)
    # (The bystander sends nothing while the campaign runs: its session must outlive the heartbeat timeout.)
    server = Daemon("--tenants", str(tenants), "--op-time-limit", "2", "--heartbeat-timeout", "3600", *rules)
    try:
        alice = hostile_ops.Bystander(server.address, "alice", "alice-secret")
        allowed = hostile_ops.allowed_overloads()
        names = random.Random(0).sample(allowed, CALLS - 2 * len(FINDINGS)) + FINDINGS * 2
        fuzzer = hostile_ops.OpFuzzer(server.address, "fuzz", "fuzz-secret", answer_wait_s=30)
        started = time.monotonic()
        tally = hostile_ops.campaign(fuzzer, hostile_ops.HostileCalls(seed=0, names=allowed), len(names), names=names)
        print(f"\n{time.monotonic() - started:.1f} s, {fuzzer.sessions} sessions of tenant fuzz\n{tally.summary()}")
        assert tally.total == CALLS
        assert hostile_ops.NO_ANSWER not in tally.counts, tally.summary()  # the front always said why
        assert server.process.poll() is None, f"the front died:\n{server.log()[-3000:]}"
        assert alice.problems() == []
        alice.close()
        fuzzer.close()
        # The tenant that lost workers gets a fresh one that computes.
        after = hostile_ops.OpFuzzer(server.address, "fuzz", "fuzz-secret")
        assert after.run(hostile_ops.Call("aten::add.Tensor", [hostile_ops.TensorSpec(hostile_ops.torch.float32, (3,))] * 2, {})).kind == hostile_ops.OK
        after.close()
    finally:
        server.stop()
