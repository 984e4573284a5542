"""Memory oversubscription: which storages of a device are resident, and spilling the rest.

Sessions on one device may hold more than the device has. Every storage a session holds has a
:class:`StorageRecord`; the device's :class:`DeviceMemory` keeps the resident ones within its
budget (``--device-memory``, or what the device really has) by *evicting* others to host RAM
(up to ``--host-spill``) and *restoring* them before any command reads or writes them.

Eviction copies the storage's bytes to a host buffer (pinned on a GPU server) and frees the
device memory in place with ``untyped_storage().resize_(0)``; restoring resizes it back and copies
the bytes in. The storage object never changes, so every tensor and view on it keeps its identity
and the client notices nothing but time. On a GPU every copy is stream-ordered, so the host never
waits for one: a spill runs on the owner's stream; a restore on demand on the stream of the
command that needs the bytes, after an event wait on the spill; their device time is read from
CUDA events when stats are asked.

Which storage goes: first, storages the queued commands free before anything reads them (dead
data: their bytes are dropped, not copied); then low priority classes; within a class, storages
no queued command is about to use (idle sessions' before busy ones', least recently used first),
then those the queue needs, the one needed last first (Belady's rule over a lookahead of the
queued commands). The storages of the command being run are never evicted, and stay resident
together even when they alone exceed the budget, except for in-place foreach ops (an
optimizer's step), which run on slices that fit (server/foreach_chunks.py). On a GPU, a real
out-of-memory error (from an op, an upload or a restore) also triggers eviction and a retry.

Before each slice of a session's work (its first after waiting for its turn or idling, too),
:meth:`DeviceMemory.prefetch` restores what its queued commands will need, ahead of use: on a GPU
on a side stream, overlapping the kernels already queued (other sessions' and its own). It spills
only what a restore on demand would spill first anyway, so it never adds traffic.

(A little over 500 lines: eviction order, spill and restore share the records and the budget;
host_memory.py owns the host buffers and foreach_chunks.py the ops that run in slices.)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ..policy import PRIORITIES
from . import devices

#: How many queued commands per session eviction looks ahead at.
LOOKAHEAD_COMMANDS = 64

@dataclass
class Lookahead:
    """What a session's next queued commands will do to its storages (``Session.lookahead``)."""

    uses: list[StorageRecord]  # the records they read or write, in order (repeats included)
    #: Records whose every handle a queued FREE drops before any queued command reads them. Their
    #: bytes will never be read again, so making room with them costs no copy. (Should the FREE
    #: never run, e.g. because a malformed command ends its batch first, nothing the client still
    #: names reads those bytes; a restore then gives zeros rather than a crash.)
    dead: set[StorageRecord]


class SpillExhausted(Exception):
    """Neither the device budget nor the host spill space can take what is asked."""


class StorageRecord:
    """One storage held by a session, as the device's memory manager sees it."""

    __slots__ = ("storage", "nbytes", "owner", "last_use", "host", "spilled", "ready", "device_memory")

    def __init__(self, storage: torch.UntypedStorage, nbytes: int, owner: Any) -> None:
        self.storage = storage
        self.nbytes = nbytes
        self.owner = owner  # the Session: its priority, queue and stream matter for eviction
        self.last_use = 0
        self.host: torch.Tensor | None = None  # the bytes while spilled
        self.spilled: Any = None  # on a GPU: a CUDA event, set once the bytes are all in ``host``
        #: On a GPU, after a prefetch: a CUDA event on the prefetch stream, set once the bytes are
        #: back on the device. The first stream to use them waits for it (:meth:`ensure_resident`).
        self.ready: Any = None
        self.device_memory: DeviceMemory | None = None

    @property
    def resident(self) -> bool:
        return self.host is None


#: ``StorageRecord.host`` of a dead storage whose bytes were dropped instead of spilled.
DISCARDED = torch.empty(0, dtype=torch.uint8)


def byte_view(storage: torch.UntypedStorage, nbytes: int) -> torch.Tensor:
    """The first ``nbytes`` bytes of ``storage`` as a flat uint8 tensor."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, 0, (nbytes,), (1,))


class DeviceMemory:
    """Residency of one device's session storages, within a device budget and a host budget."""

    def __init__(self, device: torch.device, budget: int | None, host_limit: int) -> None:
        self.device = device
        self.budget = budget  # None: no logical limit (a GPU's own capacity still applies)
        self.host_limit = host_limit
        self.records: set[StorageRecord] = set()
        self.resident_bytes = 0
        self.spilled_bytes = 0
        self.evictions = 0
        self.restores = 0
        self.bytes_evicted = 0
        self.bytes_restored = 0
        self.evict_seconds = 0.0
        self.restore_seconds = 0.0
        self.prefetches = 0
        self.bytes_prefetched = 0
        #: Spill traffic that bought nothing: bytes the client freed while they sat in host RAM.
        self.bytes_freed_while_spilled = 0
        self.discards = 0  # dead storages whose bytes were dropped instead of spilled
        self.bytes_discarded = 0
        self._prefetch_stream: Any = None  # on a GPU: the side stream prefetches copy on
        #: The most bytes resident when a command's operands had just been made resident.
        self.peak_resident_bytes = 0
        self._clock = 0
        self._untimed: list[tuple[str, Any, Any]] = []  # GPU copies: ("evict"|"restore", start, end) events
        #: In a worker under the front's broker: the lease that ``budget`` and ``host_limit`` are
        #: (server/worker/leases.py); asked for more before this worker spills its own storages.
        self.lease: Any = None

    # ------------------------------------------------------------------------------------------
    def track(self, record: StorageRecord) -> None:
        record.device_memory = self
        self.records.add(record)
        self.resident_bytes += record.nbytes
        self.touch((record,))

    def forget(self, record: StorageRecord) -> None:
        if record not in self.records:
            return
        self.records.discard(record)
        if record.resident:
            self.resident_bytes -= record.nbytes
        elif record.host is DISCARDED:
            record.host = None
        else:
            self.spilled_bytes -= record.nbytes
            self.bytes_freed_while_spilled += record.nbytes
            record.owner.memory.spilled -= record.nbytes
            record.host = record.spilled = None
        record.storage = None  # type: ignore[assignment]

    def resized(self, record: StorageRecord, nbytes: int) -> None:
        if record.resident and record in self.records:
            self.resident_bytes += nbytes - record.nbytes
        record.nbytes = nbytes

    def touch(self, records: Iterable[StorageRecord]) -> None:
        self._clock += 1
        for record in records:
            record.last_use = self._clock

    # ------------------------------------------------------------------------------------------
    def ensure_resident(self, records: list[StorageRecord]) -> None:
        """Restore every spilled record in ``records`` (making room first), keeping all of
        ``records`` safe from eviction meanwhile."""
        spilled = [record for record in records if not record.resident]
        if spilled:
            needed = sum(record.nbytes for record in spilled)
            self.fit(needed, protect=records)
            for record in spilled:
                self._restore(record, protect=records)
        for record in records:
            if record.ready is not None:  # prefetched on the side stream: order after that copy
                torch.cuda.current_stream(self.device).wait_event(record.ready)
                record.ready = None
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)
        self.touch(records)

    def prefetch(self, owner: Any) -> None:
        """Bring back, ahead of use, the spilled storages ``owner``'s queued commands will need.

        Called before each slice of ``owner``'s work, so on a GPU the copies run on a side stream
        while the kernels already queued run (the first command that uses a prefetched storage
        waits for its copy on the device, not on the host). A prefetch never adds spill traffic:
        it fills free room, and otherwise spills only storages no queued command needs that
        belong to a lower priority class or to a session with no queued work (what a restore on
        demand would spill first anyway). A busy session's storage beyond the lookahead is not
        "never needed", so spilling it early would cost a spill now and a restore later. Best
        effort: what does not fit is restored on demand as before, and nothing here raises.
        """
        if self.budget is None or not owner.memory.spilled:
            return  # (the common case, checked first: the scan below reads the queue)
        own = owner.lookahead(LOOKAHEAD_COMMANDS)
        wanted: dict[int, StorageRecord] = {}
        for record in own.uses:
            if record.device_memory is self:
                wanted.setdefault(id(record), record)
        spilled = [record for record in wanted.values() if not record.resident]  # nearest use first
        if not spilled:
            return
        short = self.resident_bytes + sum(record.nbytes for record in spilled) - self.budget
        if short > 0 and self.lease is not None:
            # Room other workers can give without slowing anyone: free memory, lower priority
            # classes' storages, idle peers' (the broker asks them: leases.py).
            self.lease.want(resident=short, prefetch=True, protect=set(spilled))
        next_use, dead = self._scan_queues(known={id(owner): own})
        own_class = PRIORITIES.get(owner.priority, 1)

        def gives_way(victim: StorageRecord) -> bool:
            if not victim.resident or not victim.nbytes:
                return False
            if victim in dead:
                return True
            if id(victim) in next_use:
                return False
            victim_class = PRIORITIES.get(victim.owner.priority, 1)
            return victim_class < own_class or (victim_class == own_class and not victim.owner.has_work())

        victims = sorted(filter(gives_way, self.records),
                         key=lambda victim: self._eviction_order(victim, next_use, dead))
        for record in spilled:
            excess = self.resident_bytes + record.nbytes - self.budget
            while excess > 0 and victims and (
                    victims[0] in dead or self.spilled_bytes + victims[0].nbytes <= self.host_limit):
                victim = victims.pop(0)
                self._discard(victim) if victim in dead else self._evict(victim)
                excess -= victim.nbytes
            if excess > 0:
                break
            try:
                self._restore(record, prefetch=True)
            except torch.OutOfMemoryError:
                break  # the card itself is fuller than the budget says: leave it to demand
            self.touch((record,))

    def retrying_oom(self, allocate: Callable[[], Any], *, protect: Iterable[StorageRecord] = ()) -> Any:
        """Run ``allocate``; when the device's own allocator reports out of memory (workspaces,
        fragmentation, memory the budget does not see), spill more and retry, more each time."""
        for attempt in range(4):
            try:
                return allocate()
            except torch.OutOfMemoryError:
                if attempt == 3:
                    raise
                self.evict((64 << 20) << (2 * attempt), protect=protect)
        raise AssertionError("unreachable")

    def fit(self, extra: int = 0, *, protect: Iterable[StorageRecord] = ()) -> None:
        """Evict until ``extra`` more bytes fit in the budget; :class:`SpillExhausted` if not.
        Under a lease, ask the broker for the room first (others may give it)."""
        if self.budget is None:
            return
        excess = self.resident_bytes + extra - self.budget
        if excess > 0 and self.lease is not None:
            protect = set(protect)
            self.lease.want(resident=excess, protect=protect)
            excess = self.resident_bytes + extra - self.budget
        if excess > 0:
            self.evict(excess, protect=protect)

    def shrink_to(self, budget: int, *, protect: Iterable[StorageRecord] = ()) -> None:
        """Spill (by the usual order) until at most ``budget`` bytes are resident, sparing
        ``protect`` (the broker asked this worker to give way: server/worker/leases.py)."""
        excess = self.resident_bytes - budget
        if excess > 0:
            self.evict(excess, protect=protect, ask=False, overshoot=True)

    def evict(self, at_least: int, *, protect: Iterable[StorageRecord] = (), ask: bool = True,
              overshoot: bool = False) -> int:
        """Spill resident records (least valuable first) totalling ``at_least`` bytes.

        What the current command itself touches (``protect``) stays resident even if that alone
        exceeds the budget: an op needs its operands on the device. :class:`SpillExhausted`
        only when host RAM cannot take what would have to go. Under a lease (``ask``: not while
        answering the broker itself), the host room the spill needs is asked for first
        (server/worker/leases.py); while the worker waits for it, a SHRINK may spill some of
        these records already, so what is left is planned again, a few times at most.
        ``overshoot``: the host limit may be passed by one storage (a worker giving way to
        another spills whole storages; the broker set aside only the bytes it asked for).
        """
        protected = set(protect)
        freed = 0
        blocked = 0
        for _ in range(3 if ask and self.lease is not None else 1):
            next_use, dead = self._scan_queues()
            candidates = sorted(
                (r for r in self.records if r.resident and r not in protected and r.nbytes),
                key=lambda record: self._eviction_order(record, next_use, dead),
            )
            if ask and self.lease is not None:
                planned = spilled = 0
                for record in candidates:
                    if freed + planned >= at_least:
                        break
                    planned += record.nbytes
                    spilled += 0 if record in dead else record.nbytes
                if self.spilled_bytes + spilled > self.host_limit:
                    self.lease.want(spill=self.spilled_bytes + spilled - self.host_limit, protect=protected)
            blocked = 0
            for record in candidates:
                if freed >= at_least:
                    break
                if not record.resident:  # (spilled meanwhile: a SHRINK answered while waiting on the lease)
                    continue
                if record in dead:
                    self._discard(record)
                    freed += record.nbytes
                    continue
                room = self.host_limit - self.spilled_bytes
                if record.nbytes > room and not (overshoot and room > 0):
                    blocked += record.nbytes
                    continue
                self._evict(record)
                freed += record.nbytes
            if freed >= at_least or not blocked:
                break
        if freed < at_least and blocked:
            raise SpillExhausted(self.describe_shortage(at_least - freed))
        return freed

    def describe_shortage(self, short_by: int) -> str:
        budget = "no set limit" if self.budget is None else _size(self.budget)
        return (
            f"device memory exhausted on {self.device}: {_size(self.resident_bytes)} resident "
            f"(budget {budget}), {_size(self.spilled_bytes)} spilled to host RAM (limit "
            f"{_size(self.host_limit)}), {_size(short_by)} more could not be made room for"
        )

    def _scan_queues(self, known: dict[int, Lookahead] | None = None) -> tuple[dict[int, int], set[StorageRecord]]:
        """Read the queued commands (the next few of each session with storages here; ``known``:
        lookaheads already read, by ``id`` of their session).

        Returns, for records those commands will touch, how soon: the position of their first
        mention among the records a session's commands name (an order within a session, not a
        count of commands). Evicting those would only bring them straight back, and of two, the
        one needed later should go first (Belady's rule). And the dead records: freed before
        anything reads them (:class:`Lookahead`)."""
        next_use: dict[int, int] = {}
        dead: set[StorageRecord] = set()
        for owner in {id(r.owner): r.owner for r in self.records}.values():
            lookahead = (known or {}).get(id(owner)) or owner.lookahead(LOOKAHEAD_COMMANDS)
            for distance, record in enumerate(lookahead.uses):
                next_use.setdefault(id(record), distance)
            dead |= lookahead.dead
        return next_use, dead

    @staticmethod
    def _eviction_order(record: StorageRecord, next_use: dict[int, int],
                        dead: set[StorageRecord]) -> tuple[int, int, int, int]:
        """Sort key, first evicted first: dead storages (no copy); then low priority classes;
        then what no queued command needs (idle sessions' first, least recently used first);
        then what is needed latest."""
        if record in dead:
            return (-1, 0, 0, record.last_use)
        owner = record.owner
        distance = next_use.get(id(record))
        if distance is None:
            return (PRIORITIES.get(owner.priority, 1), 0, 1 if owner.has_work() else 0, record.last_use)
        return (PRIORITIES.get(owner.priority, 1), 1, -distance, record.last_use)

    # ------------------------------------------------------------------------------------------
    def _evict(self, record: StorageRecord) -> None:
        owner = record.owner
        source = byte_view(record.storage, record.nbytes)
        if record.ready is not None:  # prefetched and never used: the spill waits for that copy
            owner.stream.wait_event(record.ready)
            record.ready = None
        if owner.stream is None:  # CPU backend: a plain copy
            started = time.perf_counter()
            host = torch.empty(record.nbytes, dtype=torch.uint8)
            host.copy_(source)
            record.storage.resize_(0)
            self.evict_seconds += time.perf_counter() - started
        else:
            # On the owner's stream, after the kernels it queued that may still write these bytes;
            # the host does not wait. The freed device block is marked as used by that stream, so
            # the allocator hands it out again only after the copy; a restore waits for ``spilled``.
            host = torch.empty(record.nbytes, dtype=torch.uint8, pin_memory=True)
            start, end = devices.timing_event(), devices.timing_event()
            with torch.cuda.stream(owner.stream):
                start.record()
                host.copy_(source, non_blocking=True)
                end.record()
                source.record_stream(owner.stream)
                record.storage.resize_(0)
            record.spilled = end
            self._time_copy("evict", start, end)
        record.host = host
        self.resident_bytes -= record.nbytes
        self.spilled_bytes += record.nbytes
        owner.memory.spilled += record.nbytes
        self.evictions += 1
        self.bytes_evicted += record.nbytes

    def _discard(self, record: StorageRecord) -> None:
        """Free a dead storage's device memory without copying its bytes anywhere."""
        owner = record.owner
        if owner.stream is not None:
            if record.ready is not None:  # a prefetch copy may still be writing the block
                owner.stream.wait_event(record.ready)
                record.ready = None
            # Freed after the kernels the owner queued that still use the block.
            byte_view(record.storage, record.nbytes).record_stream(owner.stream)
        record.storage.resize_(0)
        record.host = DISCARDED
        self.resident_bytes -= record.nbytes
        self.discards += 1
        self.bytes_discarded += record.nbytes

    def _restore(self, record: StorageRecord, *, protect: Iterable[StorageRecord] = (), prefetch: bool = False) -> None:
        host = record.host
        assert host is not None
        if host is DISCARDED:  # a dead storage asked for after all (see Lookahead.dead): zeros
            self.retrying_oom(lambda: record.storage.resize_(record.nbytes), protect=protect)
            byte_view(record.storage, record.nbytes).zero_()
            record.host = None
            self.resident_bytes += record.nbytes
            return
        started = time.perf_counter()
        if prefetch:  # no eviction and retry for a prefetch: an out-of-memory error ends it
            record.storage.resize_(record.nbytes)
        else:
            self.retrying_oom(lambda: record.storage.resize_(record.nbytes), protect=protect)
        # Every byte the allocator just handed back is overwritten: ``host`` is the storage's exact
        # size (copied whole at eviction; a copy of any other size would fail, not leave a gap), so
        # a restore never exposes what another tenant left in the block.
        target = byte_view(record.storage, record.nbytes)
        if host.is_pinned():
            # A restore on demand runs on the stream of the command that needs the bytes (its
            # session's, current here): ordered before that command's kernels, so the host does
            # not wait. A prefetch runs on the side stream, after what the current stream queued
            # (the block it was just given may be one that stream's earlier kernels still use),
            # and leaves ``ready`` for the first stream to use the bytes to wait for. The host
            # buffer goes back to torch's pinned pool, which holds it until the copy is done.
            stream = consumer = torch.cuda.current_stream(self.device)
            if prefetch:
                stream = self._side_stream()
                stream.wait_stream(consumer)
            if record.spilled is not None:  # the spill copy (on the owner's stream) must be complete
                stream.wait_event(record.spilled)
            start, end = devices.timing_event(), devices.timing_event()
            with torch.cuda.stream(stream):
                start.record(stream)
                target.copy_(host, non_blocking=True)
                end.record(stream)
            if prefetch:
                target.record_stream(stream)  # freed before use: not reused until the copy is done
                record.ready = end
            self._time_copy("restore", start, end)
        else:
            target.copy_(host)
            self.restore_seconds += time.perf_counter() - started
        if prefetch:
            self.prefetches += 1
            self.bytes_prefetched += record.nbytes
        record.spilled = None
        record.host = None
        self.resident_bytes += record.nbytes
        self.spilled_bytes -= record.nbytes
        record.owner.memory.spilled -= record.nbytes
        self.restores += 1
        self.bytes_restored += record.nbytes

    def _side_stream(self) -> Any:
        if self._prefetch_stream is None:
            self._prefetch_stream = devices.cuda_stream(self.device)
        return self._prefetch_stream

    def _time_copy(self, kind: str, start: Any, end: Any) -> None:
        self._untimed.append((kind, start, end))
        if len(self._untimed) > 256:
            self._collect_copy_times(wait=False)

    def _collect_copy_times(self, *, wait: bool) -> None:
        """Add the device time of finished GPU spill and restore copies to the totals."""
        pending = []
        for kind, start, end in self._untimed:
            if wait:
                end.synchronize()
            elif not end.query():
                pending.append((kind, start, end))
                continue
            seconds = start.elapsed_time(end) / 1e3
            if kind == "evict":
                self.evict_seconds += seconds
            else:
                self.restore_seconds += seconds
        self._untimed = pending

    def stats(self, *, wait: bool = True) -> dict[str, Any]:
        """The figures; ``wait=False`` (the front's periodic REPORTs) counts the seconds of copies
        that have finished and never waits for the device."""
        self._collect_copy_times(wait=wait)
        return {
            "resident_bytes": self.resident_bytes, "spilled_bytes": self.spilled_bytes,
            "device_budget": self.budget, "host_spill_limit": self.host_limit,
            "evictions": self.evictions, "restores": self.restores,
            "bytes_evicted": self.bytes_evicted, "bytes_restored": self.bytes_restored,
            "evict_seconds": self.evict_seconds, "restore_seconds": self.restore_seconds,
            "peak_resident_bytes": self.peak_resident_bytes,
            "prefetches": self.prefetches, "bytes_prefetched": self.bytes_prefetched,
            "bytes_freed_while_spilled": self.bytes_freed_while_spilled,
            "discards": self.discards, "bytes_discarded": self.bytes_discarded,
        }


def _size(nbytes: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{int(nbytes)} B"
