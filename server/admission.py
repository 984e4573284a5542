"""Admission: who may open a session, at what priority, on which devices, or who waits in line.

The front's policy decisions, apart from the loop that carries them out (front.py): the priority a
client gets (at most its tenant's), how many devices it may ask for, where a session is placed
(binpack or spread, the tenant's allowed device names, ``--max-sessions`` per device, the
oversubscription ratio of quotas to device memory, the tenant's session cap), and the order of
the admission queue (priority classes first, then first come).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from . import policy
from .policy import PolicyError, PoolConfig, Tenant
from .workers import WorkerProcess


@dataclass
class FrontDevice:
    """One device of the daemon, as the front sees it: its facts (from the zygote's probe), the
    sessions placed on it, and, with oversubscription, the broker of its memory."""

    index: int
    spec: str  # "cpu", "cuda:0", ...
    facts: dict[str, Any]
    sessions: list[Any] = field(default_factory=list)  # FrontSessions
    broker: Any = None
    #: Why the device is unhealthy (server/telemetry/health.py), or None: no new session is placed on it.
    unhealthy: str | None = None

    @property
    def name(self) -> str:
        return str(self.facts.get("name", self.spec))

    @property
    def total_memory(self) -> int:
        return int(self.facts.get("total_memory", 0))


@dataclass
class Waiting:
    """A client in the admission queue."""

    identity: bytes
    info: dict[str, Any]
    tenant: Tenant
    priority: str
    device_count: int = 1
    owner: str | None = None  # the ZAP User-Id it said HELLO with (CURVE), see auth.py
    authenticated: bool = False  # whether the tenant is known for sure (a key or a token)
    since: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    request: str = ""  # the id the front's log gives its HELLO
    #: With --pool: the devices the client's reservation holds here (the pool placed it), and
    #: the memory it reserved on each (its session's quota, at most its tenant's).
    pinned: tuple[int, ...] | None = None
    memory_quota: int | None = None


@dataclass
class FrontSession:
    """A session as the front knows it: who, where, and the figures its worker last reported."""

    id: str
    identity: bytes  # the client's routing id
    owner: str | None
    tenant: Tenant
    priority: str
    weight: float
    memory_quota: int
    devices: list[FrontDevice]
    worker: WorkerProcess
    info: dict[str, Any]
    created: float = field(default_factory=time.time)
    opened: bool = False  # the worker said OPENED (and the client got WELCOME)
    stats: dict[str, Any] = field(default_factory=dict)
    request: str = ""  # the id the front's log gave its HELLO


def admitted_priority(pool: PoolConfig, tenant: Tenant, requested: Any) -> str:
    priority = policy.parse_priority(requested) if requested else "normal"
    if pool.has_tenants and policy.PRIORITIES[priority] > policy.PRIORITIES[tenant.priority]:
        return tenant.priority  # a tenant's priority is its clients' ceiling
    return priority


def pinned_devices(info: dict[str, Any], tenant: Tenant, devices: list[FrontDevice]) -> list[int] | None:
    """The devices a HELLO pins (``device_indices``: a pool's placement, ``tcp://host:port#N``
    entries), checked: distinct, existing, allowed for the tenant; None when it pins none."""
    pinned = info.get("device_indices")
    if pinned is None:
        return None
    if not pinned or len(set(pinned)) != len(pinned) or any(
            type(index) is not int or not 0 <= index < len(devices) for index in pinned):
        raise PolicyError(f"device_indices {pinned!r} must name distinct devices of this daemon, 0..{len(devices) - 1}")
    refused = [index for index in pinned if not tenant.allows_device(devices[index].name)]
    if refused:
        raise PolicyError(f"tenant {tenant.name!r} may not use device(s) {refused} of this daemon "
                          f"(it may use {tenant.device_names})")
    return list(pinned)


def requested_devices(info: dict[str, Any], tenant: Tenant, devices: list[FrontDevice]) -> int:
    pinned = pinned_devices(info, tenant, devices)
    if pinned is not None:
        return len(pinned)
    count = info.get("devices", 1)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise PolicyError(f"LIBREMOTE_DEVICES must be a positive integer (got {count!r})")
    available = sum(1 for device in devices if tenant.allows_device(device.name))
    if count > available:
        raise PolicyError(f"asked for {count} devices (LIBREMOTE_DEVICES); this daemon can give "
                          f"tenant {tenant.name!r} at most {available}")
    return count


def quota_fits(pool: PoolConfig, device: FrontDevice, quota: int, *, alone: bool = False) -> bool:
    """With --oversubscribe R, the quotas of a device's sessions add up to at most R times its
    memory (the device budget, or its real size)."""
    if pool.oversubscribe is None:
        return True
    capacity = pool.device_memory or device.total_memory
    committed = 0 if alone else sum(session.memory_quota for session in device.sessions)
    return committed + quota <= pool.oversubscribe * capacity


def place(pool: PoolConfig, devices: list[FrontDevice], tenant: Tenant, count: int,
          pinned: list[int] | None = None) -> list[FrontDevice] | None:
    """``count`` distinct devices for a new session, by the placement policy, or None. ``pinned``:
    exactly these devices, in this order (a placement made elsewhere), or None while one of them
    cannot take the session."""
    limit = pool.max_sessions_per_device
    candidates = [device for device in devices
                  if tenant.allows_device(device.name) and not device.unhealthy
                  and (limit is None or len(device.sessions) < limit)
                  and quota_fits(pool, device, tenant.memory_quota)]
    if pinned is not None:
        by_index = {device.index: device for device in candidates}
        return [by_index[index] for index in pinned] if all(index in by_index for index in pinned) else None
    if len(candidates) < count:
        return None
    if pool.placement == "spread":
        ordered = sorted(candidates, key=lambda device: (len(device.sessions), device.index))
    elif limit is None:  # binpack without a limit: everyone on the first allowed devices
        ordered = candidates
    else:  # binpack: the fullest device that still has room first
        ordered = sorted(candidates, key=lambda device: (-len(device.sessions), device.index))
    return ordered[:count]


def reserved_devices(devices: list[FrontDevice], pinned: tuple[int, ...]) -> list[FrontDevice] | None:
    """The devices a pool reservation names, if they exist and are healthy (else None: the client
    is refused, its reservation stands for devices this daemon cannot give)."""
    if any(not 0 <= index < len(devices) or devices[index].unhealthy for index in pinned):
        return None
    return [devices[index] for index in pinned]


def unhealthy_reason(devices: list[FrontDevice], tenant: Tenant, count: int,
                     pinned: list[int] | None = None) -> str | None:
    """Why a session of ``tenant`` cannot be placed because of device health (fewer than
    ``count`` of its allowed devices are healthy, or a pinned one is not), or None."""
    if pinned is not None:
        sick = [devices[index] for index in pinned if devices[index].unhealthy]
        return "; ".join(f"device {device.index} ({device.spec}) is unhealthy: {device.unhealthy}"
                         for device in sick) or None
    allowed = [device for device in devices if tenant.allows_device(device.name)]
    if sum(1 for device in allowed if not device.unhealthy) >= count:
        return None
    return "; ".join(f"device {device.index} ({device.spec}) is unhealthy: {device.unhealthy}"
                     for device in allowed if device.unhealthy)


def devices_full(pool: PoolConfig, devices: list[FrontDevice], tenant: Tenant) -> bool:
    limit = pool.max_sessions_per_device
    return limit is not None and all(len(device.sessions) >= limit for device in devices
                                     if tenant.allows_device(device.name))


def queue_order(waiter: Waiting) -> tuple[int, float]:
    return (-policy.PRIORITIES[waiter.priority], waiter.since)
