"""The front's memory broker: one device's budget, leased to the workers that share it.

With oversubscription on, sessions of several tenants share a device whose budget (``--device-
memory``, or the card less headroom) is smaller than their memory together, and what does not
fit lives spilled in host RAM (``--host-spill``). Each tenant's storages live in its own worker,
which alone can spill them; so the budget is cut into *leases*, bytes a worker may keep resident
and bytes it may keep spilled, and each worker keeps within its lease (server/worker/leases.py).

A worker that needs more asks (WANT). The broker gives free room first; otherwise it asks other
workers to give way (SHRINK), in the order a single process would have evicted their storages:
lower priority classes first; then, of the asking worker's class, those with no queued work, and
(except for a prefetch, which never slows a busy peer) the busy ones down to an even share. Each
spills by its own eviction order and answers with what it now holds (SHRUNK); the broker passes
on what was freed (GRANT). It never waits on a worker for long: what a silent worker has not
given within :data:`SHRINK_TIMEOUT_S` is not given, and the asker spills its own storages for the
rest. One WANT per device is worked on at a time, so two workers never take the same bytes.

Storages spill whole, and the broker does not know their sizes: a worker that gives way may spill
one storage past the host room set aside for it (the host budget may then be passed by at most a
storage per worker giving way; its next WANT of host room waits until some is freed).

The broker trusts no worker's figures beyond its own bookkeeping: leases are capped at the budget.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from libremote_wire.messages import Ctl

log = logging.getLogger("libremote.server.broker")

SHRINK_TIMEOUT_S = 1.0
#: A GPU's budget when the operator set none (``--device-memory``): the card less headroom for
#: the CUDA context, cuBLAS/cuDNN workspaces and temporaries inside ops (at least 2 GiB, or 6%).
#: What the estimate misses, the workers' out-of-memory retry catches.
GPU_HEADROOM_FRACTION = 0.06
GPU_HEADROOM_MIN = 2 << 30


def default_budget(device: str, total_memory: int) -> int:
    """The resident budget of a device (``"cpu"``, ``"cuda:0"``, ...) when the operator set none."""
    if device == "cpu":
        return total_memory  # the CPU backend has no allocator that says "full"
    headroom = max(GPU_HEADROOM_MIN, int(total_memory * GPU_HEADROOM_FRACTION))
    return max(total_memory - headroom, total_memory // 2)
PRIORITIES = {"low": 0, "normal": 1, "high": 2}


@dataclass
class Lease:
    resident: int = 0
    spill: int = 0


@dataclass
class Want:
    worker: str
    resident: int
    spill: int
    prefetch: bool
    request: int  # the worker's number for it, echoed in the GRANT
    asked: set[str] = field(default_factory=set)  # workers whose SHRUNK is awaited
    deadline: float = 0.0


#: (worker id, control header) pairs for the front to send.
Outgoing = list[tuple[str, list[Any]]]


class DeviceBroker:
    """Leases of one device's budget (``budget`` resident bytes, ``host`` spilled bytes)."""

    def __init__(self, index: int, budget: int, host: int, priority_of: Callable[[str, int], str]) -> None:
        self.index = index
        self.budget = budget
        self.host = host
        self._priority_of = priority_of  # (worker id, device index) -> its highest session priority
        self.leases: dict[str, Lease] = {}
        self.queue: collections.deque[Want] = collections.deque()
        self.current: Want | None = None
        self.grants = 0
        self.shrinks = 0

    # ------------------------------------------------------------------------------------------
    def free(self) -> tuple[int, int]:
        resident = sum(lease.resident for lease in self.leases.values())
        spill = sum(lease.spill for lease in self.leases.values())
        return max(0, self.budget - resident), max(0, self.host - spill)

    def want(self, worker: str, resident: int, spill: int, prefetch: bool, request: int) -> Outgoing:
        self.leases.setdefault(worker, Lease())
        log.debug("device %d: %s wants %d resident, %d spill (prefetch %s); leases %s", self.index, worker, resident,
                  spill, prefetch, self.leases)
        self.queue.append(Want(worker, min(max(resident, 0), self.budget), min(max(spill, 0), self.host), prefetch, request))
        return self._advance()

    def shrunk(self, worker: str, resident: int, spilled: int) -> Outgoing:
        """A worker says what it holds now (after a SHRINK, or unasked after freeing)."""
        lease = self.leases.get(worker)
        log.debug("device %d: %s holds %d resident, %d spill now", self.index, worker, resident, spilled)
        if lease is not None:
            if resident <= 0 and spilled <= 0 and (self.current is None or self.current.worker != worker):
                del self.leases[worker]
            else:
                lease.resident = min(max(resident, 0), self.budget)
                lease.spill = min(max(spilled, 0), self.host)
        if self.current is not None:
            self.current.asked.discard(worker)
        return self._advance()

    def drop(self, worker: str) -> Outgoing:
        """The worker is gone: its leases return to the pool."""
        self.leases.pop(worker, None)
        self.queue = collections.deque(want for want in self.queue if want.worker != worker)
        if self.current is not None:
            if self.current.worker == worker:
                self.current = None
            else:
                self.current.asked.discard(worker)
        return self._advance()

    def tick(self, now: float) -> Outgoing:
        if self.current is not None and self.current.asked and now > self.current.deadline:
            self.current.asked.clear()  # (silent workers gave nothing)
        return self._advance()

    # ------------------------------------------------------------------------------------------
    def _advance(self) -> Outgoing:
        out: Outgoing = []
        while True:
            if self.current is None:
                if not self.queue:
                    return out
                self.current = self.queue.popleft()
                if self.current.worker not in self.leases:
                    self.current = None
                    continue
                out += self._ask_others(self.current)
            if self.current.asked:
                return out
            out.append(self._grant(self.current))
            self.current = None

    def _ask_others(self, want: Want) -> Outgoing:
        """SHRINK whoever should give way for ``want`` (nobody when free room covers it).

        Each SHRINK names two leases: one for a worker with no queued work on the device (it
        gives what is asked) and one for a busy worker (a lower class still gives it; a peer of
        the asker's class keeps an even share, or everything for a prefetch)."""
        free_resident, free_host = self.free()
        short = want.resident - free_resident
        if short <= 0:
            return []
        own_class = PRIORITIES.get(self._priority_of(want.worker, self.index), 1)
        holders = [(worker, lease) for worker, lease in self.leases.items() if worker != want.worker and lease.resident > 0]
        even_share = self.budget // (len(holders) + 1)
        ranked = sorted(
            ((PRIORITIES.get(self._priority_of(worker, self.index), 1), worker, lease) for worker, lease in holders),
            key=lambda item: (item[0], -item[2].resident))
        out: Outgoing = []
        asked = set()
        for victim_class, worker, lease in ranked:
            if short <= 0 or free_host <= 0 or victim_class > own_class:
                break
            take = min(short, lease.resident, free_host)
            idle_target = lease.resident - take
            if victim_class < own_class:
                busy_target = idle_target
            elif want.prefetch:
                busy_target = lease.resident
            else:
                busy_target = max(idle_target, min(lease.resident, even_share))
            # Room in host RAM is set aside for what it spills (its SHRUNK says what it used).
            lease.spill += take
            short -= take
            free_host -= take
            asked.add(worker)
            self.shrinks += 1
            out.append((worker, [Ctl.SHRINK, self.index, idle_target, busy_target, lease.spill]))
            log.debug("device %d: %s asked to give way to %s: to %d idle, %d busy", self.index, worker, want.worker,
                      idle_target, busy_target)
        want.asked = asked
        want.deadline = time.monotonic() + SHRINK_TIMEOUT_S
        return out

    def _grant(self, want: Want) -> tuple[str, list[Any]]:
        free_resident, free_host = self.free()
        lease = self.leases.setdefault(want.worker, Lease())
        lease.resident += min(want.resident, free_resident)
        lease.spill += min(want.spill, free_host)
        self.grants += 1
        log.debug("device %d: %s granted %s", self.index, want.worker, lease)
        return want.worker, [Ctl.GRANT, self.index, lease.resident, lease.spill, want.request]

    def stats(self) -> dict[str, Any]:
        free_resident, free_host = self.free()
        return {"leased_resident_bytes": self.budget - free_resident, "leased_spill_bytes": self.host - free_host,
                "lease_holders": len(self.leases), "lease_grants": self.grants, "lease_shrinks": self.shrinks}
