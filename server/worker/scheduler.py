"""Which session runs next: priority classes first, then weighted fair share of device time.

Every session with queued work competes for its device. The scheduler picks, among those in the
highest priority class with work, the one with the smallest *virtual time*: a session's virtual
time advances by the device time it used divided by its weight, so over any busy period each
session receives device time in proportion to its weight (start-time fair queueing). A session
that was idle rejoins at the current virtual time instead of spending credit it saved while idle.

Work runs in slices of a bounded number of commands, so a long batch from a low-priority session
yields to a high-priority arrival within one slice. "Device time" is the host time spent
executing the slice (on the CPU backend that is the compute itself), plus, on a GPU, what the
device took beyond it, measured with CUDA events once the slice's kernels have run (the daemon's
``SliceTimer``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, TypeVar

from ..policy import PRIORITIES


class Schedulable(Protocol):
    priority: str
    weight: float
    virtual_time: float

    def has_work(self) -> bool: ...


#: What :meth:`Scheduler.pick` chooses among, and hands back as itself (the worker's Session).
S = TypeVar("S", bound=Schedulable)


class Scheduler:
    """One per device: picks the next session to run a slice for."""

    def __init__(self) -> None:
        self._virtual_now = 0.0

    def rejoin(self, session: Schedulable) -> None:
        """A session that had no queued work now has some."""
        if session.virtual_time < self._virtual_now:
            session.virtual_time = self._virtual_now

    def pick(self, sessions: Iterable[S]) -> S | None:
        best = None
        best_key = None
        for session in sessions:
            if not session.has_work():
                continue
            key = (-PRIORITIES[session.priority], session.virtual_time)
            if best_key is None or key < best_key:
                best, best_key = session, key
        if best is not None:
            self._virtual_now = max(self._virtual_now, best.virtual_time)
        return best

    def charge(self, session: Schedulable, seconds: float) -> None:
        session.virtual_time += seconds / session.weight
