"""The pool's scheduler on its own: priority classes, then weighted fair share of device time.

Plain stand-in sessions (priority, weight, virtual_time, has_work) drive the real
:class:`Scheduler`; no daemon, no torch client. Each "round" is what the daemon's loop does per
device: pick a session, run a slice, charge the slice's device time.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from libremote_server.worker.scheduler import Scheduler


@dataclass(eq=False)
class Stub:
    name: str
    priority: str = "normal"
    weight: float = 1.0
    virtual_time: float = 0.0
    work: bool = True

    def has_work(self) -> bool:
        return self.work


def run_rounds(scheduler: Scheduler, sessions: list[Stub], rounds: int, slice_s=lambda: 1.0) -> dict[str, float]:
    """Pick + charge ``rounds`` times; return device time received per session name."""
    received = {s.name: 0.0 for s in sessions}
    for _ in range(rounds):
        chosen = scheduler.pick(sessions)
        assert chosen is not None
        seconds = slice_s()
        scheduler.charge(chosen, seconds)
        received[chosen.name] += seconds
    return received


def jain(values: list[float]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


# ------------------------------------------------------------------------------------------------
# Priority classes
# ------------------------------------------------------------------------------------------------
def test_higher_priority_is_always_picked_first():
    scheduler = Scheduler()
    high = Stub("high", priority="high", virtual_time=1e9)  # far "behind" in fairness terms
    normal = Stub("normal", priority="normal", virtual_time=0.0)
    low = Stub("low", priority="low", virtual_time=0.0)
    sessions = [low, normal, high]
    received = run_rounds(scheduler, sessions, 200)
    assert received == {"high": 200.0, "normal": 0.0, "low": 0.0}
    high.work = False
    assert scheduler.pick(sessions) is normal
    received = run_rounds(scheduler, sessions, 50)
    assert received == {"high": 0.0, "normal": 50.0, "low": 0.0}
    normal.work = False
    assert scheduler.pick(sessions) is low


def test_high_priority_arrival_preempts_at_the_next_pick():
    scheduler = Scheduler()
    normal = Stub("normal")
    high = Stub("high", priority="high", work=False)
    sessions = [normal, high]
    run_rounds(scheduler, sessions, 10)
    high.work = True
    scheduler.rejoin(high)
    assert scheduler.pick(sessions) is high


@pytest.mark.parametrize("order", [0, 1, 2])
def test_equal_priority_picks_smallest_virtual_time(order):
    scheduler = Scheduler()
    sessions = [Stub("a", virtual_time=5.0), Stub("b", virtual_time=2.0), Stub("c", virtual_time=9.0)]
    sessions = sessions[order:] + sessions[:order]
    assert scheduler.pick(sessions).name == "b"


def test_sessions_without_work_are_not_picked():
    scheduler = Scheduler()
    idle = Stub("idle", priority="high", work=False)
    busy = Stub("busy", priority="low", virtual_time=100.0)
    assert scheduler.pick([idle, busy]) is busy
    busy.work = False
    assert scheduler.pick([idle, busy]) is None
    assert scheduler.pick([]) is None


# ------------------------------------------------------------------------------------------------
# Weighted fair share
# ------------------------------------------------------------------------------------------------
def test_weights_one_and_three_converge_to_one_to_three():
    scheduler = Scheduler()
    light, heavy = Stub("light", weight=1.0), Stub("heavy", weight=3.0)
    received = run_rounds(scheduler, [light, heavy], 4000)
    ratio = received["heavy"] / received["light"]
    assert ratio == pytest.approx(3.0, rel=0.03), received
    assert received["heavy"] / 4000 == pytest.approx(0.75, rel=0.03), received


def test_weights_hold_with_uneven_slice_lengths():
    """Slices of random lengths (as real device time is): shares still follow the weights."""
    rng = random.Random(1234)
    scheduler = Scheduler()
    sessions = [Stub("w1", weight=1.0), Stub("w2", weight=2.0), Stub("w4", weight=4.0)]
    received = run_rounds(scheduler, sessions, 7000, slice_s=lambda: rng.uniform(0.001, 0.05))
    total = sum(received.values())
    assert received["w1"] / total == pytest.approx(1 / 7, rel=0.05), received
    assert received["w2"] / total == pytest.approx(2 / 7, rel=0.05), received
    assert received["w4"] / total == pytest.approx(4 / 7, rel=0.05), received


@pytest.mark.parametrize("count", [2, 5, 16])
def test_equal_weights_are_fair(count):
    rng = random.Random(count)
    scheduler = Scheduler()
    sessions = [Stub(f"s{i}") for i in range(count)]
    received = run_rounds(scheduler, sessions, 200 * count, slice_s=lambda: rng.uniform(0.5, 1.5))
    assert jain(list(received.values())) >= 0.99, received


def test_fairness_only_within_a_priority_class():
    """Weights never let a lower class overtake a higher one."""
    scheduler = Scheduler()
    heavy_low = Stub("heavy_low", priority="low", weight=1000.0)
    light_normal = Stub("light_normal", priority="normal", weight=0.001)
    received = run_rounds(scheduler, [heavy_low, light_normal], 100)
    assert received["heavy_low"] == 0.0


# ------------------------------------------------------------------------------------------------
# Rejoining after idling: no saved credit
# ------------------------------------------------------------------------------------------------
def test_session_rejoining_after_idle_gets_no_saved_credit():
    scheduler = Scheduler()
    a, b = Stub("a"), Stub("b")
    sleeper = Stub("sleeper", work=False)
    sessions = [a, b, sleeper]
    run_rounds(scheduler, sessions, 1000)  # a and b run; the sleeper's virtual time stays at 0
    assert sleeper.virtual_time == 0.0
    current = min(a.virtual_time, b.virtual_time)
    assert current >= 400

    sleeper.work = True
    scheduler.rejoin(sleeper)
    assert sleeper.virtual_time >= current - 1.0  # raised to (about) the current virtual time

    picks = []
    for _ in range(60):
        chosen = scheduler.pick(sessions)
        scheduler.charge(chosen, 1.0)
        picks.append(chosen.name)
    # It runs soon, but does not monopolise the device on credit saved while idle.
    assert "sleeper" in picks[:3], picks
    longest = max(len(run) for run in "".join("S" if p == "sleeper" else "." for p in picks).split("."))
    assert longest <= 2, picks
    assert picks.count("sleeper") == pytest.approx(20, abs=3), picks


def test_rejoin_does_not_lower_a_virtual_time_that_is_ahead():
    scheduler = Scheduler()
    a = Stub("a")
    run_rounds(scheduler, [a], 10)
    ahead = Stub("ahead", virtual_time=1e6)
    scheduler.rejoin(ahead)
    assert ahead.virtual_time == 1e6


def test_rejoin_with_a_weight_keeps_its_share_afterwards():
    scheduler = Scheduler()
    a = Stub("a", weight=1.0)
    late = Stub("late", weight=3.0, work=False)
    run_rounds(scheduler, [a, late], 500)
    late.work = True
    scheduler.rejoin(late)
    received = run_rounds(scheduler, [a, late], 4000)
    assert received["late"] / received["a"] == pytest.approx(3.0, rel=0.03), received
