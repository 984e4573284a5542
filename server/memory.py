"""Per-session memory accounting at the storage level.

Views share their base's storage, so a session is charged once per storage, however many handles
point into it. Storages are keyed by their ``StorageImpl`` address (``_cdata``), which stays the
same for the storage's whole life, even when its bytes are resized.
"""

from __future__ import annotations

import torch


class MemoryAccount:
    __slots__ = ("_storages", "allocated", "peak")

    def __init__(self) -> None:
        # storage key -> [number of handles on it, bytes charged for it]
        self._storages: dict[int, list[int]] = {}
        self.allocated = 0
        self.peak = 0

    def add(self, tensor: torch.Tensor) -> int:
        """Charge for ``tensor``'s storage (once per storage); return the key to release it by."""
        storage = tensor.untyped_storage()
        key = storage._cdata
        entry = self._storages.get(key)
        if entry is not None:
            entry[0] += 1
            return key
        nbytes = storage.nbytes()
        self._storages[key] = [1, nbytes]
        self.allocated += nbytes
        if self.allocated > self.peak:
            self.peak = self.allocated
        return key

    def release(self, key: int) -> None:
        entry = self._storages[key]
        entry[0] -= 1
        if entry[0] == 0:
            del self._storages[key]
            self.allocated -= entry[1]

    def refresh(self, tensor: torch.Tensor) -> bool:
        """Re-read the size of ``tensor``'s storage after an op may have resized it (``resize_``,
        an ``out=`` argument); return whether it grew."""
        storage = tensor.untyped_storage()
        entry = self._storages.get(storage._cdata)
        if entry is None:
            return False
        nbytes = storage.nbytes()
        grew = nbytes > entry[1]
        self.allocated += nbytes - entry[1]
        entry[1] = nbytes
        if self.allocated > self.peak:
            self.peak = self.allocated
        return grew

    def reset_peak(self) -> None:
        self.peak = self.allocated

    @property
    def storage_count(self) -> int:
        return len(self._storages)
