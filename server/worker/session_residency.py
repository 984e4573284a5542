"""A session's side of oversubscription: what a command touches is made resident first, its
results are fitted into the device's lease, a foreach step too large for the device runs in
slices, and a real out-of-memory error on a GPU spills and retries (residency.py, leases.py).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from libremote_wire.messages import ErrorKind

from . import foreach_chunks, op_policy, values
from .errors import CommandError
from .residency import DeviceMemory, SpillExhausted, StorageRecord

if TYPE_CHECKING:
    from .memory import MemoryAccount

log = logging.getLogger("libremote.server")


class ResidencyMixin:
    """Residency for :class:`~.session.Session`'s commands (a mixin: state lives on the session).

    The session's state and methods this mixin uses are declared below for the type checker
    only (``if TYPE_CHECKING``): they name what it relies on, and mypy checks that Session
    defines each with the same type, while at run time the class body holds none of them, so
    nothing here shadows the session's own through the MRO.
    """

    if TYPE_CHECKING:
        # Session state (session.py).
        device_memories: list[DeviceMemory | None]
        memory: MemoryAccount
        tensors: dict[int, torch.Tensor]
        _failed: dict[int, str]
        ops_executed: int

        # Session's methods (session.py).
        def _index_of(self, device: torch.device | None) -> int: ...
        def _store(self, handle: Any, tensor: Any) -> None: ...
        def _drop(self, handle: int) -> None: ...

    # ------------------------------------------------------------------------------------------
    # Oversubscription: keep what an op touches resident, and the device within its budget
    # ------------------------------------------------------------------------------------------
    def _device_memory_of(self, tensor: torch.Tensor) -> DeviceMemory | None:
        return self.device_memories[self._index_of(tensor.device)]

    def _prefetch(self) -> None:
        """Before a slice: bring back what the queued commands will need (DeviceMemory.prefetch)."""
        for device_memory in {id(dm): dm for dm in self.device_memories if dm is not None}.values():
            device_memory.prefetch(self)

    def _make_resident(self, what: str, tensors: list[torch.Tensor]) -> list[StorageRecord]:
        """Restore the storages these tensors use (spilled ones come back first)."""
        records = list({id(r): r for t in tensors for r in self.memory.records_of(t)}.values())
        try:
            # (Every record the account holds is tracked, so its device_memory is set: track().)
            managers = {id(r.device_memory): r.device_memory for r in records if r.device_memory is not None}
            for device_memory in managers.values():
                device_memory.ensure_resident([r for r in records if r.device_memory is device_memory])
        except SpillExhausted as exc:
            raise CommandError(ErrorKind.OOM, what, str(exc)) from None
        return records

    def _foreach_in_slices(self, entry: op_policy.OpEntry, args: list[Any], kwargs: dict[str, Any],
                           outs: Any) -> tuple[Any] | None:
        """Run a foreach op whose operands (and results) do not fit the device budget together on
        slices of its lists that do, storing each slice's results as it goes so that the budget
        sees them (server/foreach_chunks.py). Returns ``(result,)``, or None when not split."""
        lists = list(foreach_chunks.tensor_lists(args, kwargs))
        device_memory = self._device_memory_of(lists[0][0]) if lists else None
        if device_memory is None or device_memory.budget is None:
            return None
        returns_list = bool(entry.overload._schema.returns)
        length = len(lists[0])
        records_at = [list({id(r): r for r in (self.memory.record_of(lst[i]) for lst in lists if i < len(lst))
                            if r is not None}.values()) for i in range(length)]
        # Bytes per index: its operands, and for ops that return tensors, room for the largest.
        per_index = [sum(r.nbytes for r in records) + (max((r.nbytes for r in records), default=0) if returns_list else 0)
                     for records in records_at]
        if sum(per_index) <= device_memory.budget:
            return None  # it fits: one op moves less than several slices would
        ranges = foreach_chunks.slices(args, kwargs, per_index, device_memory.budget)
        handles = outs[0] if returns_list and isinstance(outs, list) and outs and isinstance(outs[0], list) else None
        if ranges is None or (returns_list and (handles is None or len(handles) != length)):
            return None

        def spilled_bytes(span: tuple[int, int]) -> int:
            spilled = {id(r): r for records in records_at[span[0]:span[1]] for r in records if not r.resident}
            return sum(r.nbytes for r in spilled.values())

        # Slices already resident first: the last op left its last slices on the device, and
        # starting there (not at index 0, which it spilled first) moves the least.
        ranges.sort(key=spilled_bytes)
        results: list[Any] = [None] * length
        for start, stop in ranges:
            slice_args, slice_kwargs = foreach_chunks.arguments(args, kwargs, start, stop)
            records = self._make_resident(entry.name, values.tensors_in(slice_args, slice_kwargs))
            produced = self._call(entry, slice_args, slice_kwargs, records)
            if handles is not None:
                results[start:stop] = produced
                for handle, tensor in zip(handles[start:stop], produced):
                    if handle is not None:
                        self._store(handle, tensor)
                self._fit_on_device(entry.name, records, [handles[start:stop]])
        self.ops_executed += 1
        return (results if returns_list else None,)

    def _call(self, entry: op_policy.OpEntry, args: list[Any], kwargs: dict[str, Any],
              inputs: Any) -> Any:
        """Run the op; with oversubscription on, a real out-of-memory error from the device makes
        room (evicting other storages, more each time) and retries."""
        if not self.memory.managed:
            return entry.call(*args, **kwargs)
        device_memory = self.device_memories[self._index_of(values.device_of(args, kwargs))]
        if device_memory is None:
            return entry.call(*args, **kwargs)
        try:
            return device_memory.retrying_oom(lambda: entry.call(*args, **kwargs), protect=inputs)
        except SpillExhausted as exc:
            raise CommandError(ErrorKind.OOM, entry.name, str(exc)) from None

    def _fit_on_device(self, what: str, inputs: list[StorageRecord], outs: Any) -> None:
        """New outputs are resident: evict others to get back within the device budget, or undo
        the op and raise out-of-memory when host RAM cannot take the overflow either."""
        outputs = [self.tensors[h] for h in values.flatten_handles(outs) if isinstance(h, int) and h in self.tensors]
        records = inputs + [r for t in outputs for r in self.memory.records_of(t)]
        try:
            for device_memory in {id(dm): dm for dm in self.device_memories if dm is not None}.values():
                device_memory.fit(protect=records)
                device_memory.touch(records)
        except SpillExhausted as exc:
            for handle in values.flatten_handles(outs):
                if isinstance(handle, int):
                    self._drop(handle)
                    self._failed[handle] = f"{what} failed: {exc}"
            raise CommandError(ErrorKind.OOM, what, str(exc)) from None
