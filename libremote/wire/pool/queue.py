"""The pool-wide queue's rule: who may be placed now.

Waiters are ordered by priority class (high, normal, low), then by arrival (the revision that
created their key). A waiter is placed when capacity fits it and no waiter ahead of it would fit
the same capacity now (the head among those that fit): a higher class always goes first, and a
small request may pass a large one that cannot fit anyway (backfilling), as Kubernetes' scheduler
does. Each waiter's key lives under its client's lease: a client that dies leaves the queue
within its lease's TTL.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .placement import Request
from .records import PRIORITY_CLASS, Waiter

#: Waiters ahead that are checked for fitting first (beyond these, order is not enforced: the
#: check is one placement per waiter, and a queue this long ahead means the pool is saturated).
LOOKAHEAD = 64


def request_of(waiter: Waiter, policy: str = "binpack") -> Request:
    return Request(devices=waiter.devices, memory=waiter.memory, model=waiter.model, node=waiter.node, policy=policy,
                   tenant=waiter.tenant, priority=waiter.priority, exclusive=waiter.exclusive)


def ahead_of(ordered: Sequence[Waiter], rid: str | None, priority: str, revision: int | None) -> list[Waiter]:
    """The waiters ahead of ``rid`` (not yet queued: all of its class and above, as a newcomer)."""
    mine = (PRIORITY_CLASS.get(priority, "1"), revision if revision is not None else 1 << 62)
    return [w for w in ordered if w.rid != rid and (PRIORITY_CLASS.get(w.priority, "1"), w.revision) < mine]


def may_go(ahead: Sequence[Waiter], fits: Callable[[Waiter], bool]) -> bool:
    """Whether a waiter may take capacity now: none of the first LOOKAHEAD ahead of it fits."""
    return not any(fits(waiter) for waiter in ahead[:LOOKAHEAD])
