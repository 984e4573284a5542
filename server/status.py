"""The status report: what ``libremote status`` shows, from the front's registry and the
workers' figures.

The front asks every worker for a REPORT when a STATUS comes (front.py); once all have answered,
or :data:`STATUS_TIMEOUT_S` has passed, this builds the report from the front's own registry
(devices, sessions, the queue, workers) and the workers' figures (memory, ops, device time,
residency). Totals of workers that have stopped stay counted (:func:`retire`).
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from libremote_wire import __version__

from . import admission, auth
from .admission import FrontDevice, FrontSession, Waiting
from .host import host_memory_info
from .policy import PoolConfig
from .telemetry.collect import Telemetry
from .workers import WorkerPool

STATUS_TIMEOUT_S = 2.0


class PoolState(Protocol):
    """What the report is made of: the front's registry (front.py's ``Front`` is one)."""

    address: str
    torch_version: str
    pool: PoolConfig
    devices: list[FrontDevice]
    sessions: dict[bytes, FrontSession]
    waiting: list[Waiting]
    workers: WorkerPool
    retired: dict[int, dict[str, Any]]
    draining: str | None
    telemetry: Telemetry | None


@dataclass
class StatusRequest:
    """A STATUS being answered: who asked, and the workers' REPORTs so far."""

    identity: bytes
    viewer: auth.Requester
    awaiting: set[str]
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)


def retire(retired: dict[int, dict[str, Any]], report: dict[str, Any]) -> None:
    """Fold a stopping worker's last REPORT into the per-device totals that outlive it."""
    for row in report.get("devices", ()):
        if isinstance(row, dict) and isinstance(row.get("index"), int):
            _accumulate(retired.setdefault(row["index"], {}),
                        {"busy_s": row.get("busy_s", 0.0),
                         **{key: value for key, value in (row.get("residency") or {}).items() if key in _CUMULATIVE}})


def report(front: PoolState, reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The report for ``libremote status`` (all of it; auth.visible_status trims it per viewer)."""
    now = time.monotonic()
    health = front.telemetry.health.latest if front.telemetry is not None else {"devices": {}, "host": {}}
    per_device: dict[int, list[dict[str, Any]]] = {}
    for worker_report in reports.values():
        for entry in worker_report.get("devices", ()):
            if isinstance(entry, dict) and isinstance(entry.get("index"), int):
                per_device.setdefault(entry["index"], []).append(entry)
    device_rows = []
    for device in front.devices:
        rows = per_device.get(device.index, [])
        free, total = host_memory_info() if device.spec == "cpu" else (
            min((r["memory_free"] for r in rows if "memory_free" in r), default=device.total_memory),
            device.total_memory)
        if device.broker is not None:
            total = min(total, device.broker.budget)  # what the pool may keep resident
        retired = front.retired.get(device.index, {})
        used = sum(s.stats.get("memory_allocated", 0) for s in device.sessions if s.devices[0] is device)
        row: dict[str, Any] = {
            "index": device.index, "device": device.spec, "name": device.name,
            "memory_used": used, "memory_total": total, "memory_free": free,
            # (a GPU's caching allocators hold more than the tensors; under oversubscription, what is resident)
            "memory_reserved": max(used, sum(r.get("memory_reserved", 0) for r in rows),
                                   sum((r.get("residency") or {}).get("resident_bytes", 0) for r in rows)),
            "utilization": min(1.0, sum(r.get("utilization", 0.0) for r in rows)),
            "sessions": len(device.sessions),
            "busy_s": sum(r.get("busy_s", 0.0) for r in rows) + retired.get("busy_s", 0.0),
            "health": health_row(health["devices"].get(device.index), device.unhealthy),
        }
        if device.broker is not None:
            residency: dict[str, Any] = dict.fromkeys(_RESIDENCY_KEYS, 0)
            for part in [r["residency"] for r in rows if "residency" in r] + [retired]:
                _accumulate(residency, {key: value for key, value in part.items() if key in _RESIDENCY_KEYS})
            row["residency"] = {**residency, "device_budget": device.broker.budget,
                                "host_spill_limit": device.broker.host, **device.broker.stats()}
        device_rows.append(row)
    session_rows = [{
        "session": s.id, "tenant": s.tenant.name, "priority": s.priority, "weight": s.weight,
        "device": s.devices[0].index, "devices": [d.index for d in s.devices],
        "memory_allocated": 0, "memory_peak": 0, "memory_spilled": 0, "ops": 0, "device_time_s": 0.0,
        "queued_batches": 0, **{k: v for k, v in s.stats.items() if k not in ("session", "priority", "weight")},
        "memory_quota": s.memory_quota, "pid": s.info.get("pid"), "host": s.info.get("host"),
        "age_s": time.time() - s.created, "worker_pid": s.worker.pid,
    } for s in front.sessions.values() if s.opened]
    waiting_rows = [{"tenant": w.tenant.name, "priority": w.priority, "waited_s": now - w.since,
                     "pid": w.info.get("pid"), "host": w.info.get("host")}
                    for w in sorted(front.waiting, key=admission.queue_order)]
    worker_rows = [{"worker": w.id, "key": w.key if w.key == w.tenant.name else "session", "tenant": w.tenant.name,
                    "pid": w.pid, "state": w.state, "sessions": len(w.sessions)}
                   for w in front.workers.workers.values()]
    return {"daemon": {"address": front.address, "libremote": __version__, "torch": front.torch_version,
                       "pid": os.getpid(), "host": socket.gethostname(), "graph_compiler": front.pool.graph_compiler,
                       "worker_crashes": front.workers.crashes, "draining": front.draining,
                       "metrics": front.telemetry.endpoint if front.telemetry is not None else None},
            "devices": device_rows, "sessions": session_rows, "waiting": waiting_rows, "workers": worker_rows,
            "host": dict(health.get("host") or {})}


def health_row(sample: dict[str, Any] | None, unhealthy: str | None) -> dict[str, Any]:
    """A device's health as status shows it: healthy or not and why, and its figures (None: not
    available, ``unavailable_because`` says why)."""
    row = dict(sample or {"source": "none", "reasons": [], "unavailable": [], "unavailable_because": "not sampled yet"})
    row.pop("index", None)
    row["healthy"] = not unhealthy and not row.get("reasons")
    return row



#: A device's residency figures (server/worker/residency.py ``DeviceMemory.stats``), summed over
#: its workers; the cumulative ones also over workers that have stopped.
_CUMULATIVE = frozenset({
    "evictions", "restores", "bytes_evicted", "bytes_restored", "evict_seconds", "restore_seconds",
    "peak_resident_bytes", "prefetches", "bytes_prefetched", "bytes_freed_while_spilled", "discards",
    "bytes_discarded"})
_RESIDENCY_KEYS = _CUMULATIVE | {"resident_bytes", "spilled_bytes"}


def _accumulate(total: dict[str, Any], part: dict[str, Any]) -> None:
    """Add a worker's figures to ``total`` (peaks: the largest)."""
    for key, value in part.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            previous = total.get(key, 0)
            total[key] = max(previous, value) if key.startswith("peak") else previous + value
