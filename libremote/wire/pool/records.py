"""What the pool keeps in etcd and under which keys (all JSON, all under the pool's prefix).

=====================================  ============================  ===========================
key (after ``/libremote/pools/NAME/``)  value                         lives as long as
=====================================  ============================  ===========================
``daemons/ID``                          :class:`DaemonRecord`         the daemon's lease
``reservations/ID/DEVICE/RID``          :class:`Reservation`          the client's lease
``tenants/TENANT/RID``                  :class:`Reservation`          the client's lease
``claims/RID``                          the claiming daemon's ID      the client's lease
``queue/CLASS/RID``                     :class:`Waiter`               the waiting client's lease
``quotas/TENANT``                       :class:`Quota`                until the operator removes it
``sharing/ID/DEVICE``                   ``exclusive`` or ``shared``   until the operator changes it
=====================================  ============================  ===========================

A daemon's figures (memory free and used, sessions, load) change every few seconds and matter
to people, not to placement (which counts reservations): the daemon rewrites ``daemons/ID`` only
when something placement reads changes (state, devices, sharing), and its fresh figures every
few seconds under ``/libremote/figures/NAME/ID`` (same lease), outside the pool's prefix, so that
clients waiting in the queue, which watch the prefix, are not woken by them.

A daemon's ID is ``NODE:PORT`` (what ``--node-name`` says and the port it listens on). A
reservation is written twice in one transaction, under its device (capacity) and under its
tenant (quota), so that a transaction can compare either range cheaply.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

#: Queue classes: etcd keys sort as bytes, so high priority's digit comes first.
PRIORITY_CLASS = {"high": "0", "normal": "1", "low": "2"}
STATES = ("ready", "draining", "unhealthy")
SHARING = ("shared", "exclusive")


def daemon_key(prefix: str, daemon_id: str) -> str:
    return f"{prefix}daemons/{daemon_id}"


def reservation_key(prefix: str, daemon_id: str, device: int, rid: str) -> str:
    return f"{prefix}reservations/{daemon_id}/{device}/{rid}"


def device_reservations(prefix: str, daemon_id: str, device: int) -> str:
    return f"{prefix}reservations/{daemon_id}/{device}/"


def tenant_key(prefix: str, tenant: str, rid: str) -> str:
    return f"{prefix}tenants/{tenant}/{rid}"


def tenant_reservations(prefix: str, tenant: str) -> str:
    return f"{prefix}tenants/{tenant}/"


def claim_key(prefix: str, rid: str) -> str:
    return f"{prefix}claims/{rid}"


def queue_key(prefix: str, priority: str, rid: str) -> str:
    return f"{prefix}queue/{PRIORITY_CLASS.get(priority, '1')}/{rid}"


def quota_key(prefix: str, tenant: str) -> str:
    return f"{prefix}quotas/{tenant}"


def sharing_key(prefix: str, daemon_id: str, device: int) -> str:
    return f"{prefix}sharing/{daemon_id}/{device}"


def figures_prefix(pool: str) -> str:
    """Where daemons' fresh figures live (a full :class:`DaemonRecord` each), outside the pool's prefix."""
    return f"/libremote/figures/{pool}/"


def placement_view(record: DaemonRecord) -> DaemonRecord:
    """``record`` without what only informs people (figures, time): what placement reads."""
    return replace(record, updated=0.0, devices=tuple(
        replace(device, memory_free=0, memory_used=0, sessions=0, load=0.0) for device in record.devices))


def dumps(record: Any) -> str:
    return json.dumps(asdict(record), separators=(",", ":"), sort_keys=True)


@dataclass(frozen=True)
class DeviceRecord:
    """One device of a daemon as the pool sees it."""

    index: int
    model: str  # the chip's name, e.g. "NVIDIA H100 80GB HBM3" (a client pins it with LIBREMOTE_MODEL)
    spec: str  # the daemon's name for it: cuda:0, cpu, ...
    memory_total: int
    memory_free: int = 0
    memory_used: int = 0
    sessions: int = 0
    load: float = 0.0  # utilization, 0..1
    state: str = "ready"
    sharing: str = "shared"


@dataclass(frozen=True)
class DaemonRecord:
    """A daemon of the pool: where clients reach it and what it has (refreshed every few seconds)."""

    id: str
    address: str  # tcp://host:port, as clients reach its front
    node: str
    version: str
    state: str = "ready"
    session_memory: int = 8 << 30  # the memory a session gets when the client names none (--memory-quota)
    max_sessions: int = 16  # sessions per device (--max-sessions)
    devices: tuple[DeviceRecord, ...] = ()
    updated: float = 0.0  # time.time() of the figures

    @classmethod
    def loads(cls, raw: bytes | str) -> DaemonRecord:
        data = json.loads(raw)
        devices = tuple(DeviceRecord(**device) for device in data.pop("devices", ()))
        return cls(devices=devices, **data)


@dataclass(frozen=True)
class Reservation:
    """A client's claim on devices of one daemon: written by the client's placement (under its
    lease), checked and claimed by the daemon when the client says HELLO."""

    rid: str
    daemon: str
    devices: tuple[int, ...]
    memory: int  # per device
    tenant: str
    priority: str = "normal"
    exclusive: bool = False
    secret_sha256: str = ""  # the daemon checks the client's HELLO against it
    host: str = ""
    pid: int = 0
    created: float = 0.0

    @classmethod
    def loads(cls, raw: bytes | str) -> Reservation:
        data = json.loads(raw)
        data["devices"] = tuple(data.get("devices", ()))
        return cls(**data)


@dataclass(frozen=True)
class Waiter:
    """A client waiting in the pool-wide queue: what it asks for."""

    rid: str
    tenant: str
    priority: str
    devices: int
    memory: int | None
    model: str | None = None
    node: str | None = None
    exclusive: bool = False
    host: str = ""
    pid: int = 0
    since: float = 0.0
    revision: int = field(default=0, compare=False)  # the key's create_revision: its arrival

    @classmethod
    def loads(cls, raw: bytes | str, revision: int = 0) -> Waiter:
        data = json.loads(raw)
        data.pop("revision", None)
        return cls(revision=revision, **data)


@dataclass(frozen=True)
class Quota:
    """A tenant's caps across the whole pool (None: no cap)."""

    memory: int | None = None
    devices: int | None = None

    @classmethod
    def loads(cls, raw: bytes | str) -> Quota:
        return cls(**json.loads(raw))
