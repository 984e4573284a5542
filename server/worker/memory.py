"""Per-session memory accounting at the storage level.

Views share their base's storage, so a session is charged once per storage, however many handles
point into it. Storages are keyed by their ``StorageImpl`` address (``_cdata``), which stays the
same for the storage's whole life, even when its bytes are resized or spilled.

Tensors the session holds without a handle (a graph's intermediates while the graph runs) are
charged too, for as long as they live (:meth:`MemoryAccount.hold`): the quota and the peak see
what a graph needs at once, not only what it returns.

``allocated`` is the session's *virtual* figure (what its quota and ``torch.cuda.memory_allocated``
see); with oversubscription on, each storage also has a :class:`~.residency.StorageRecord` with
its device's memory manager, and ``spilled`` says how much of it lives in host RAM right now.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from . import sparse
from .residency import DeviceMemory, StorageRecord

#: CUDA's caching allocator serves blocks up to 1 MiB from its small pool, larger ones from its
#: large pool; ``torch.cuda.memory_stats`` reports the two apart, and so does a session here.
SMALL_POOL_MAX_BYTES = 1 << 20


class PoolStats:
    """What ``torch.cuda.memory_stats`` reports for one pool, for one session's storages: now,
    at the peak, and over the session's life (bytes and storage counts)."""

    __slots__ = ("bytes", "peak_bytes", "allocated_bytes", "freed_bytes",
                 "count", "peak_count", "allocations", "frees")

    def __init__(self) -> None:
        self.bytes = self.peak_bytes = self.allocated_bytes = self.freed_bytes = 0
        self.count = self.peak_count = self.allocations = self.frees = 0

    def grow(self, nbytes: int, new_storage: bool) -> None:
        self.bytes += nbytes
        self.allocated_bytes += nbytes
        if self.bytes > self.peak_bytes:
            self.peak_bytes = self.bytes
        if new_storage:
            self.count += 1
            self.allocations += 1
            if self.count > self.peak_count:
                self.peak_count = self.count

    def shrink(self, nbytes: int, freed_storage: bool) -> None:
        self.bytes -= nbytes
        self.freed_bytes += nbytes
        if freed_storage:
            self.count -= 1
            self.frees += 1


class _Entry:
    __slots__ = ("handles", "nbytes", "record", "pool")

    def __init__(self, nbytes: int, record: StorageRecord | None, pool: PoolStats) -> None:
        self.handles = 1
        self.nbytes = nbytes
        self.record = record
        self.pool = pool


class MemoryAccount:
    def __init__(self, owner: Any = None,
                 device_memory_for: Callable[[torch.Tensor], DeviceMemory | None] | None = None) -> None:
        self._entries: dict[int, _Entry] = {}
        self._owner = owner
        self._device_memory_for = device_memory_for
        #: Whether storages are residency-managed (oversubscription or a device budget is on). A
        #: plain attribute, not a property: it is read several times for every op.
        self.managed = device_memory_for is not None
        self.allocated = 0
        self.peak = 0
        self.peak_count = 0
        self.spilled = 0  # maintained by the device memory managers
        self.large_pool, self.small_pool = PoolStats(), PoolStats()
        #: Storages charged through :meth:`hold`: key -> [live tensors, bytes].
        self._held: dict[int, list[int]] = {}
        #: id of a weakref to each held tensor -> (the weakref, its storage's key). (By id: a
        #: weakref compares equal by its live referents, and tensors compare elementwise.)
        self._holders: dict[int, tuple[weakref.ref[torch.Tensor], int]] = {}

    def add(self, tensor: torch.Tensor) -> Any:
        """Charge for ``tensor``'s storage (once per storage); return the key to release it by. A
        sparse tensor is charged for the storages of its indices and values: its key is the
        tuple of theirs (see sparse.py)."""
        if tensor.layout is not torch.strided:
            return tuple(self.add(part) for part in sparse.parts(tensor))
        return self.add_strided(tensor)

    def add_strided(self, tensor: torch.Tensor) -> int:
        """:meth:`add` of a tensor known to be strided (one storage; its key is the storage's)."""
        storage = tensor.untyped_storage()
        key: int = storage._cdata
        entry = self._entries.get(key)
        if entry is not None:
            entry.handles += 1
            return key
        held = self._held.pop(key, None)
        if held is not None:  # a graph's result, charged while the graph ran: charged here now
            self.allocated -= held[1]
        nbytes = storage.nbytes()
        record = None
        if self._device_memory_for is not None:
            device_memory = self._device_memory_for(tensor)
            if device_memory is not None:
                record = StorageRecord(storage, nbytes, self._owner)
                device_memory.track(record)
        pool = self.small_pool if nbytes <= SMALL_POOL_MAX_BYTES else self.large_pool
        pool.grow(nbytes, True)
        self._entries[key] = _Entry(nbytes, record, pool)
        self.allocated += nbytes
        if self.allocated > self.peak:
            self.peak = self.allocated
        if len(self._entries) > self.peak_count:
            self.peak_count = len(self._entries)
        return key

    def is_charged(self, key: int) -> bool:
        """Whether the storage at ``key`` is charged to the session (a handle's, or held)."""
        return key in self._entries or key in self._held

    def hold(self, tensor: torch.Tensor) -> None:
        """Charge ``tensor``'s storage, unless the session holds it already, for as long as the
        tensor object lives (a graph's intermediate: the interpreter drops it after its last use).
        Views of it each hold it too; a handle made on it later (:meth:`add`) takes the charge over."""
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._entries:
            return
        held = self._held.get(key)
        if held is None:
            held = self._held[key] = [0, storage.nbytes()]
            self.allocated += held[1]
            if self.allocated > self.peak:
                self.peak = self.allocated
        held[0] += 1
        holder = weakref.ref(tensor, self._let_go)
        self._holders[id(holder)] = (holder, key)

    def _let_go(self, holder: weakref.ref[torch.Tensor]) -> None:
        """A held tensor died (weakref callback)."""
        key = self._holders.pop(id(holder), (None, None))[1]
        held = self._held.get(key) if key is not None else None
        if key is None or held is None:
            return  # a handle took the charge over (add)
        held[0] -= 1
        if held[0] == 0:
            del self._held[key]
            self.allocated -= held[1]

    def release(self, key: Any) -> None:
        if type(key) is tuple:  # a sparse tensor's parts
            for part in key:
                self.release(part)
            return
        entry = self._entries[key]
        entry.handles -= 1
        if entry.handles == 0:
            del self._entries[key]
            self.allocated -= entry.nbytes
            entry.pool.shrink(entry.nbytes, True)
            if entry.record is not None and entry.record.device_memory is not None:
                entry.record.device_memory.forget(entry.record)

    def refresh(self, tensor: torch.Tensor) -> bool:
        """Re-read the size of ``tensor``'s storage after an op may have resized it (``resize_``,
        an ``out=`` argument); return whether it grew."""
        storage = tensor.untyped_storage()
        entry = self._entries.get(storage._cdata)
        if entry is None:
            return False
        nbytes = storage.nbytes()
        grew = nbytes > entry.nbytes
        if grew:
            entry.pool.grow(nbytes - entry.nbytes, False)
        elif nbytes < entry.nbytes:
            entry.pool.shrink(entry.nbytes - nbytes, False)
        self.allocated += nbytes - entry.nbytes
        entry.nbytes = nbytes
        if entry.record is not None and entry.record.device_memory is not None:
            entry.record.device_memory.resized(entry.record, nbytes)
        if self.allocated > self.peak:
            self.peak = self.allocated
        return grew

    def record_of(self, tensor: torch.Tensor) -> StorageRecord | None:
        if tensor.layout is not torch.strided:
            return None  # a sparse tensor has several: records_of
        return self.record_at(tensor.untyped_storage()._cdata)

    def records_of(self, tensor: torch.Tensor) -> list[StorageRecord]:
        """The records of the storages ``tensor`` uses (a sparse tensor's parts' too)."""
        tensors = sparse.parts(tensor) if tensor.layout is not torch.strided else (tensor,)
        return [record for record in map(self.record_of, tensors) if record is not None]

    def record_at(self, key: Any) -> StorageRecord | None:
        """The record of the storage :meth:`add` returned ``key`` for (no ``untyped_storage()``
        call: eviction reads the queue's handles this way, hundreds at a time). None for a sparse
        tensor's tuple of keys (the lookahead does not follow sparse tensors)."""
        if type(key) is tuple:
            return None
        entry = self._entries.get(key)
        return None if entry is None else entry.record

    def handle_count(self, key: Any) -> int:
        """How many handles (and other holders) keep the storage at ``key`` charged."""
        if type(key) is tuple:
            return 0
        entry = self._entries.get(key)
        return 0 if entry is None else entry.handles

    def reset_peak(self) -> None:
        self.peak = self.allocated
        self.peak_count = len(self._entries)
        for pool in (self.large_pool, self.small_pool):
            pool.peak_bytes, pool.peak_count = pool.bytes, pool.count

    @property
    def storage_count(self) -> int:
        return len(self._entries)
