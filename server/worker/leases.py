"""A worker's leases on device memory, from the front's broker (``libremote_server.broker``).

With oversubscription on (``--device-memory``/``--host-spill``), the tenants on one device share
its budget though each runs in its own process: none can see, let alone spill, another's
storages. So each worker holds a *lease* per device, bytes it may keep resident and bytes it may
keep spilled in host RAM, and its :class:`~.residency.DeviceMemory` treats the lease as its
budget. When a command needs more, the worker asks the front (WANT) and waits for the answer
(GRANT); the front takes the room from free memory, or makes other workers spill (SHRINK: lower
priority classes first, then idle ones; each spills its own storages by its own eviction order)
and hands on what they gave back. What the lease cannot cover, the worker spills of its own, as a
single process did before.

While it waits, the worker answers SHRINKs (the front may be asking it to give way for a third
worker, and must not wait on a worker that waits on the front) and REPORTs; other control
messages are kept for the loop.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from typing import Any

import zmq

from libremote_wire import codec, messages
from libremote_wire.messages import CONTROL, Ctl

log = logging.getLogger("libremote.server.worker")

#: A lease grows by at least this share of what the worker asked for again (fewer round trips).
_GROWTH = 0.25
#: The front answers a WANT within a second or two (it waits at most ~1 s for SHRUNKs); past this
#: the worker goes on with the lease it has (and spills its own).
_WANT_TIMEOUT_S = 5.0


class DeviceLease:
    """The lease of one device, as its DeviceMemory uses it."""

    def __init__(self, client: LeaseClient, index: int, memory: Any) -> None:
        self.client = client
        self.index = index
        self.memory = memory
        #: While a WANT waits: the records the command being run uses, which a SHRINK answered
        #: meanwhile must leave resident.
        self.protected: set[Any] = set()

    def want(self, resident: int = 0, spill: int = 0, *, prefetch: bool = False,
             protect: set[Any] | frozenset[Any] = frozenset()) -> None:
        """Ask the front for ``resident`` more bytes of device room and ``spill`` more of host
        room; returns once the lease (``memory.budget``/``memory.host_limit``) is what it grants.
        ``protect``: what the running command uses (kept resident through SHRINKs meanwhile)."""
        if resident > 0:
            resident = max(resident, int(self.memory.budget * _GROWTH))
        outer, self.protected = self.protected, self.protected | set(protect)
        try:
            self.client.want(self.index, resident, spill, prefetch)
        finally:
            self.protected = outer


class LeaseClient:
    """The worker's end of the broker protocol, on its control socket."""

    def __init__(self, control: zmq.Socket[Any], on_other: Callable[[list[bytes]], None]) -> None:
        self._control = control
        self._on_other = on_other  # the worker's handler for everything but leases
        self.leases: dict[int, DeviceLease] = {}
        #: Control messages that arrived while waiting for a GRANT, for the loop to handle after.
        self.deferred: collections.deque[list[bytes]] = collections.deque()
        self._waiting_for: int | None = None
        self._requests = 0  # WANTs sent: a GRANT names the one it answers

    def for_device(self, index: int, memory: Any) -> DeviceLease:
        self.leases[index] = lease = DeviceLease(self, index, memory)
        return lease

    def send(self, header: list[Any]) -> None:
        self._control.send(codec.packb(header))

    def want(self, index: int, resident: int, spill: int, prefetch: bool) -> None:
        self._requests += 1
        request = self._requests
        self.send([Ctl.WANT, index, max(0, resident), max(0, spill), prefetch, request])
        self._waiting_for = index
        deadline = time.monotonic() + _WANT_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                if not self._control.poll(100, zmq.POLLIN):
                    continue
                frames = self._control.recv_multipart()
                try:
                    kind, fields = messages.parse(codec.unpackb(frames[0], max_bytes=1 << 20), CONTROL)
                except codec.ProtocolError:
                    continue
                if kind == Ctl.GRANT and fields[0] == index and fields[3] == request:
                    self._apply_grant(fields)
                    return
                if kind in (Ctl.GRANT, Ctl.SHRINK):
                    self.on_control(kind, fields)
                elif kind == Ctl.REPORT:
                    self._on_other(frames)
                else:
                    self.deferred.append(frames)
        finally:
            self._waiting_for = None

    def on_control(self, kind: Ctl, fields: list[Any]) -> None:
        lease = self.leases.get(fields[0])
        if lease is None:
            return
        if kind == Ctl.GRANT:
            return  # an answer that came after its WANT gave up: stale (the broker sends no other)
        # SHRINK: spill down to the new lease (what the running command uses stays), then say
        # what is held now; that is the lease from now on.
        _, idle_resident, busy_resident, spill = fields
        memory = lease.memory
        memory.host_limit = max(memory.host_limit, spill)
        keep = busy_resident if self._busy_on(lease) else idle_resident
        # Room leased and not used goes back in any case (down to what the idle lease would be):
        # giving it costs no copy.
        memory.budget = max(0, min(memory.budget, keep, max(memory.resident_bytes, idle_resident)))
        try:
            memory.shrink_to(memory.budget, protect=lease.protected)
        except Exception:  # SpillExhausted: host room ran out; what could not go stays
            pass
        memory.budget = max(memory.budget, memory.resident_bytes)
        if self._waiting_for is None:  # (unused host room goes back; not while a spill of ours is planned on it)
            memory.host_limit = memory.spilled_bytes
        memory.host_limit = max(memory.host_limit, memory.spilled_bytes)  # (one storage past it, at most)
        log.debug("gave way on device %d: lease now %d resident, %d spill", lease.index, memory.budget, memory.host_limit)
        self.send([Ctl.SHRUNK, lease.index, memory.budget, memory.host_limit, self._busy_on(lease)])

    def _busy_on(self, lease: DeviceLease) -> bool:
        if self._waiting_for == lease.index:
            return True
        return any(record.owner.has_work() for record in lease.memory.records)

    def _apply_grant(self, fields: list[Any]) -> None:
        lease = self.leases.get(fields[0])
        if lease is not None:
            lease.memory.budget = fields[1]
            lease.memory.host_limit = fields[2]
            log.debug("granted on device %d: %d resident, %d spill", lease.index, fields[1], fields[2])

    def release_all(self, index: int) -> None:
        """No session of this worker uses the device any more: give the lease back."""
        lease = self.leases.get(index)
        if lease is not None:
            lease.memory.budget = lease.memory.host_limit = 0
            self.send([Ctl.SHRUNK, index, 0, 0, False])
