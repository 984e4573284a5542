"""The pool's placement decisions (libremote_wire/pool/placement.py, queue.py): pure functions
of the registered daemons, the reservations and the request, so tested on their own here; the
same code runs against real etcd in tests/test_pool_etcd.py and benchmarks/placement_sim.py."""

from __future__ import annotations

import pytest

from libremote_wire.pool import queue
from libremote_wire.pool.placement import (
    Load,
    Request,
    choose,
    choose_span,
    explain,
    loads,
    parse_size,
    quota_refusal,
)
from libremote_wire.pool.records import DaemonRecord, DeviceRecord, Quota, Reservation, Waiter

GiB = 1 << 30


def daemon(name: str, devices: int = 2, memory: int = 16 * GiB, model: str = "NVIDIA H100", **kw) -> DaemonRecord:
    return DaemonRecord(id=f"{name}:1", address=f"tcp://{name}:1", node=name, version="t", session_memory=8 * GiB,
                        max_sessions=4, devices=tuple(DeviceRecord(i, model, f"cuda:{i}", memory, **kw)
                                                      for i in range(devices)))


def held(*placed: tuple[str, int, int]) -> dict[tuple[str, int], Load]:
    """(daemon name, device, memory in GiB) per reservation."""
    return loads(Reservation(rid=str(i), daemon=f"{name}:1", devices=(device,), memory=memory * GiB, tenant="t")
                 for i, (name, device, memory) in enumerate(placed))


def test_binpack_fills_the_fullest_device_and_daemon_that_fits():
    pool = [daemon("a"), daemon("b")]
    load = held(("b", 1, 8))
    choice = choose(pool, load, Request(memory=4 * GiB))
    assert (choice.daemon.node, choice.devices, choice.memory) == ("b", (1,), 4 * GiB)
    # Full: the next fullest device of the same daemon.
    choice = choose(pool, held(("b", 1, 16)), Request(memory=4 * GiB))
    assert (choice.daemon.node, choice.devices) == ("b", (0,))


def test_spread_takes_the_emptiest_daemon_and_device():
    pool = [daemon("a"), daemon("b")]
    choice = choose(pool, held(("a", 0, 4), ("b", 0, 8), ("b", 1, 8)), Request(memory=GiB, policy="spread"))
    assert (choice.daemon.node, choice.devices) == ("a", (1,))


def test_pins_by_model_and_node_and_memory_defaults_to_the_daemons_quota():
    pool = [daemon("a", model="NVIDIA A100-SXM4-40GB"), daemon("b", model="NVIDIA H100 80GB HBM3")]
    assert choose(pool, {}, Request(model="h100")).daemon.node == "b"
    assert choose(pool, {}, Request(model="a100", node="a")).memory == 8 * GiB
    assert choose(pool, {}, Request(model="a100", node="b")) is None
    assert choose(pool, {}, Request(model="MI300")) is None


def test_several_devices_come_from_one_daemon_when_one_can_hold_them_else_from_the_fewest():
    pool = [daemon("a", devices=2), daemon("b", devices=4)]
    assert choose(pool, {}, Request(devices=3, memory=GiB)).daemon.node == "b"
    span = choose_span(pool, {}, Request(devices=3, memory=GiB))
    assert [(c.daemon.node, c.devices) for c in span.choices] == [("b", (0, 1, 2))]  # (binpack: one daemon)
    load = held(("b", 0, 16), ("b", 1, 16))
    assert choose(pool, load, Request(devices=3, memory=GiB)) is None
    # No daemon has 3 now: the fewest daemons, those with the most fitting devices first (a tie
    # of 2 and 2 here: the fuller daemon first).
    span = choose_span(pool, load, Request(devices=3, memory=GiB))
    assert [(c.daemon.node, c.devices) for c in span.choices] == [("b", (2, 3)), ("a", (0,))]
    assert span.order == ((0, 2), (0, 3), (1, 0)) and span.memory_total == 3 * GiB
    load = held(("b", 0, 16), ("b", 1, 16), ("b", 2, 16))
    span = choose_span(pool, load, Request(devices=3, memory=GiB))
    assert [(c.daemon.node, c.devices) for c in span.choices] == [("a", (0, 1)), ("b", (3,))]
    assert choose_span(pool, load, Request(devices=4, memory=GiB)) is None
    why = explain(pool, load, Request(devices=4, memory=GiB))
    assert "may span daemons; the pool can give 3 now (at most 2 on one daemon)" in why, why
    # Avoided daemons (they just refused this client) are left out.
    span = choose_span(pool, {}, Request(devices=2, memory=GiB), avoid=frozenset({"b:1"}))
    assert [c.daemon.node for c in span.choices] == ["a"]


def test_spread_takes_several_devices_one_per_daemon_emptiest_first():
    pool = [daemon("a", devices=2), daemon("b", devices=2), daemon("c", devices=2)]
    load = held(("c", 0, 8))
    span = choose_span(pool, load, Request(devices=4, memory=GiB, policy="spread"))
    nodes = [span.choices[position].daemon.node for position, _ in span.order]
    assert sorted(nodes[:3]) == ["a", "b", "c"] and nodes[2] == "c" and nodes[3] != "c", nodes
    assert sum(len(c.devices) for c in span.choices) == 4 and len(span.choices) == 3
    # On one daemon, spread keeps its old choice (the least-placed devices).
    single = choose_span([daemon("a", devices=4)], held(("a", 0, 8)), Request(devices=2, memory=GiB, policy="spread"))
    assert [(c.daemon.node, c.devices) for c in single.choices] == [("a", (1, 2))]


def test_sessions_per_device_unhealthy_draining_and_exclusive_devices():
    assert choose([daemon("a", devices=1)], held(*[("a", 0, 1)] * 4), Request(memory=GiB)) is None  # max_sessions 4
    assert choose([daemon("a", state="unhealthy")], {}, Request()) is None
    draining = DaemonRecord(**{**daemon("a").__dict__, "state": "draining"})
    assert choose([draining], {}, Request()) is None
    exclusive = [daemon("x", devices=1, sharing="exclusive"), daemon("s", devices=1)]
    assert choose(exclusive, {}, Request(exclusive=True)).daemon.node == "x"
    assert choose(exclusive, {}, Request(exclusive=True)).memory == 16 * GiB  # the whole card
    assert choose(exclusive, held(("x", 0, 16)), Request(exclusive=True)) is None  # one session owns it
    assert choose(exclusive[1:], {}, Request(exclusive=True)) is None  # shared devices are not exclusive
    assert choose(exclusive, {}, Request()).daemon.node == "s"  # nor do exclusive ones take shared requests


def test_ranking_daemons_by_their_summary_chooses_as_well_as_a_pass_over_every_device():
    import random

    from libremote_wire.pool.placement import summarize

    rng = random.Random(0)
    for trial in range(200):
        pool = [daemon(f"d{i}", devices=rng.choice([1, 2, 4, 8]), memory=rng.choice([40, 80]) * GiB)
                for i in range(rng.randint(1, 12))]
        placed = [(d.node, rng.randrange(len(d.devices)), rng.choice([10, 20, 40])) for d in pool
                  for _ in range(rng.randint(0, 6))]
        load = held(*placed)
        summaries = {d.id: summarize(d, load) for d in pool}
        for request in (Request(memory=rng.choice([10, 20, 40]) * GiB, devices=rng.choice([1, 2, 4]),
                                policy=rng.choice(["binpack", "spread"])) for _ in range(5)):
            full, fast = choose(pool, load, request), choose(pool, load, request, summaries)
            assert (full is None) == (fast is None), (trial, request)
            if full is not None:
                score = {d.id: summaries[d.id].room / summaries[d.id].total for d in pool}
                assert score[full.daemon.id] == score[fast.daemon.id], (trial, request)
                assert fast.memory == request.memory and len(set(fast.devices)) == request.devices


def test_quotas_cap_memory_and_devices_across_the_pool():
    request = Request(devices=2, memory=4 * GiB, tenant="t")
    assert quota_refusal(Load(0, 0), None, request, 4 * GiB) is None
    assert quota_refusal(Load(8 * GiB, 2), Quota(memory=16 * GiB), request, 4 * GiB) is None
    assert "holds 12GiB of its 16GiB" in quota_refusal(Load(12 * GiB, 3), Quota(memory=16 * GiB), request, 4 * GiB)
    assert "holds 3 of its 4 devices" in quota_refusal(Load(GiB, 3), Quota(devices=4), request, 4 * GiB)


def test_the_queue_lets_the_head_among_those_that_fit_go_first():
    def waiter(rid, priority, revision, memory):
        return Waiter(rid=rid, tenant="t", priority=priority, devices=1, memory=memory * GiB, revision=revision)

    big, small, urgent = waiter("big", "normal", 10, 64), waiter("small", "normal", 11, 1), waiter("urgent", "high", 12, 1)
    ordered = sorted([small, big, urgent], key=lambda w: ("0" if w.priority == "high" else "1", w.revision))
    assert [w.rid for w in ordered] == ["urgent", "big", "small"]
    fits = {"urgent": True, "big": False, "small": True}
    assert queue.may_go(queue.ahead_of(ordered, "urgent", "high", 12), lambda w: fits[w.rid])
    assert not queue.may_go(queue.ahead_of(ordered, "small", "normal", 11), lambda w: fits[w.rid])  # urgent first
    fits["urgent"] = False  # (placed, or it no longer fits): the small one passes the big one that cannot fit
    assert queue.may_go(queue.ahead_of(ordered, "small", "normal", 11), lambda w: fits[w.rid])
    # A newcomer queues behind everyone of its class and above.
    assert [w.rid for w in queue.ahead_of(ordered, None, "normal", None)] == ["urgent", "big", "small"]


def test_sizes():
    assert parse_size("8GiB") == 8 * GiB and parse_size("512MiB") == 512 << 20 and parse_size("1.5GB") == 1_500_000_000
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")
