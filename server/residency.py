"""Memory oversubscription: which storages of a device are resident, and spilling the rest.

Sessions on one device may hold more than the device has. Every storage a session holds has a
:class:`StorageRecord`; the device's :class:`DeviceMemory` keeps the resident ones within its
budget (``--device-memory``, or what the device really has) by *evicting* others to host RAM
(up to ``--host-spill``) and *restoring* them before any command reads or writes them.

Eviction copies the storage's bytes to a host buffer (pinned on a GPU server) and frees the
device memory in place with ``untyped_storage().resize_(0)``; restoring resizes it back and copies
the bytes in. On a GPU both copies are stream-ordered (the spill on the owner's stream, the
restore on the stream of the command that needs the bytes, after an event wait on the spill), so
the host never waits for them; their device time is read from CUDA events when stats are asked. The storage object never changes, so every tensor and view on it keeps its identity
and the client notices nothing but time. Victims are chosen by priority class (low first); within a class, storages no
queued command is about to use go first (idle sessions' before busy ones', least recently used
first), then those the queue needs, the one needed last first (Belady's rule over the lookahead);
the storages of the command being run are never evicted. On a GPU, a real
out-of-memory error (from an op, an upload or a restore) also triggers eviction and a retry. The
storages one command works on stay resident together, even when they alone exceed the budget,
except for in-place foreach ops (an optimizer's step), which run on slices that fit
(server/foreach_chunks.py).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import torch

from .pool import PRIORITIES


#: How many queued commands per session eviction looks ahead at.
LOOKAHEAD_COMMANDS = 64

#: On a GPU with no ``--device-memory``, the budget for session storages is the card's size less
#: this headroom (at least 2 GiB, or 6%): the CUDA context, cuBLAS/cuDNN workspaces and the
#: temporaries inside ops live there. What the estimate misses, the out-of-memory retry catches.
GPU_HEADROOM_FRACTION = 0.06
GPU_HEADROOM_MIN = 2 << 30


def default_device_budget(device: torch.device, total_memory: int) -> int:
    """The resident budget of a device when the operator set none."""
    if device.type == "cpu":
        return total_memory  # the CPU backend has no allocator that says "full"
    headroom = max(GPU_HEADROOM_MIN, int(total_memory * GPU_HEADROOM_FRACTION))
    return max(total_memory - headroom, total_memory // 2)


class SpillExhausted(Exception):
    """Neither the device budget nor the host spill space can take what is asked."""


class StorageRecord:
    """One storage held by a session, as the device's memory manager sees it."""

    __slots__ = ("storage", "nbytes", "owner", "last_use", "host", "spilled", "device_memory")

    def __init__(self, storage: torch.UntypedStorage, nbytes: int, owner: Any) -> None:
        self.storage = storage
        self.nbytes = nbytes
        self.owner = owner  # the Session: its priority, queue and stream matter for eviction
        self.last_use = 0
        self.host: torch.Tensor | None = None  # the bytes while spilled
        self.spilled: Any = None  # on a GPU: a CUDA event, set once the bytes are all in ``host``
        self.device_memory: DeviceMemory | None = None

    @property
    def resident(self) -> bool:
        return self.host is None


def _byte_view(storage: torch.UntypedStorage, nbytes: int) -> torch.Tensor:
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
        #: The most bytes resident when a command's operands had just been made resident.
        self.peak_resident_bytes = 0
        self._clock = 0
        self._untimed: list[tuple[str, Any, Any]] = []  # GPU copies: ("evict"|"restore", start, end) events

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
        else:
            self.spilled_bytes -= record.nbytes
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
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)
        self.touch(records)

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
        """Evict until ``extra`` more bytes fit in the budget; :class:`SpillExhausted` if not."""
        if self.budget is None:
            return
        excess = self.resident_bytes + extra - self.budget
        if excess > 0:
            self.evict(excess, protect=protect)

    def evict(self, at_least: int, *, protect: Iterable[StorageRecord] = ()) -> int:
        """Spill resident records (least valuable first) totalling ``at_least`` bytes.

        What the current command itself touches (``protect``) stays resident even if that alone
        exceeds the budget: an op needs its operands on the device. :class:`SpillExhausted`
        only when host RAM cannot take what would have to go.
        """
        protected = set(protect)
        next_use = self._next_uses()
        candidates = sorted(
            (r for r in self.records if r.resident and r not in protected and r.nbytes),
            key=lambda record: self._eviction_order(record, next_use),
        )
        freed = 0
        blocked = 0
        for record in candidates:
            if freed >= at_least:
                break
            if self.spilled_bytes + record.nbytes > self.host_limit:
                blocked += record.nbytes
                continue
            self._evict(record)
            freed += record.nbytes
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

    def _next_uses(self) -> dict[int, int]:
        """For records that commands already queued (the next few of each session) will touch:
        how many commands ahead the first of them is. Evicting those would only bring them
        straight back, and of two, the one needed later should go first (Belady's rule)."""
        next_use: dict[int, int] = {}
        for owner in {id(r.owner): r.owner for r in self.records}.values():
            for distance, record in enumerate(owner.upcoming_records(LOOKAHEAD_COMMANDS)):
                next_use.setdefault(id(record), distance)
        return next_use

    @staticmethod
    def _eviction_order(record: StorageRecord, next_use: dict[int, int]) -> tuple[int, int, int, int]:
        """Sort key, first evicted first: low priority classes; then what no queued command
        needs (idle sessions' first, least recently used first); then what is needed latest."""
        owner = record.owner
        distance = next_use.get(id(record))
        if distance is None:
            return (PRIORITIES.get(owner.priority, 1), 0, 1 if owner.has_work() else 0, record.last_use)
        return (PRIORITIES.get(owner.priority, 1), 1, -distance, record.last_use)

    # ------------------------------------------------------------------------------------------
    def _evict(self, record: StorageRecord) -> None:
        owner = record.owner
        source = _byte_view(record.storage, record.nbytes)
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
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
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

    def _restore(self, record: StorageRecord, *, protect: Iterable[StorageRecord] = ()) -> None:
        host = record.host
        assert host is not None
        started = time.perf_counter()
        self.retrying_oom(lambda: record.storage.resize_(record.nbytes), protect=protect)
        if host.is_pinned():
            # On the stream of the command that needs the bytes (its session's): ordered before
            # that command's kernels, so the host does not wait. The host buffer goes back to
            # torch's pinned pool, which holds it until the copy is done.
            stream = torch.cuda.current_stream(self.device)
            if record.spilled is not None:  # the spill copy (on the owner's stream) must be complete
                stream.wait_event(record.spilled)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            _byte_view(record.storage, record.nbytes).copy_(host, non_blocking=True)
            end.record(stream)
            self._time_copy("restore", start, end)
        else:
            _byte_view(record.storage, record.nbytes).copy_(host)
            self.restore_seconds += time.perf_counter() - started
        record.spilled = None
        record.host = None
        self.resident_bytes += record.nbytes
        self.spilled_bytes -= record.nbytes
        record.owner.memory.spilled -= record.nbytes
        self.restores += 1
        self.bytes_restored += record.nbytes

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

    def stats(self) -> dict[str, Any]:
        self._collect_copy_times(wait=True)
        return {
            "resident_bytes": self.resident_bytes, "spilled_bytes": self.spilled_bytes,
            "device_budget": self.budget, "host_spill_limit": self.host_limit,
            "evictions": self.evictions, "restores": self.restores,
            "bytes_evicted": self.bytes_evicted, "bytes_restored": self.bytes_restored,
            "evict_seconds": self.evict_seconds, "restore_seconds": self.restore_seconds,
            "peak_resident_bytes": self.peak_resident_bytes,
        }


def _size(nbytes: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{int(nbytes)} B"
