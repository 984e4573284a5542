"""What the front counts and publishes for its metrics, dashboard and probes.

The front's loop is single-threaded and owns its structures; the HTTP server (http.py) runs in
another thread. So the loop keeps plain counters (:class:`FrontCounters`: dict and integer
updates where admission, refusals and messages already happen) and, every ``interval_s``, asks its
workers for a REPORT as ``libremote status`` does; when the answers are in, :meth:`Telemetry.publish`
builds one new snapshot (plain dicts and tuples, never touched again) and replaces
:attr:`Telemetry.latest` with it, a single reference assignment. The HTTP thread reads only that
reference, so a scrape never sees a half-updated structure and never makes the loop wait.

Labels stay bounded: tenants are counted under their names up to :data:`MAX_TENANTS` (a daemon
with a tenants file or keys has as many as its operator configured; on an open daemon, where
clients name themselves, the rest are counted under ``_other``), sessions appear only while they
live, and error kinds, message kinds and refusal reasons are fixed sets.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

from .config import TelemetryConfig
from .health import DeviceRef, HealthSampler
from .metrics import REFUSAL_REASONS

if TYPE_CHECKING:
    from ..admission import FrontDevice, FrontSession
    from ..policy import PoolConfig
    from ..workers import WorkerPool

log = logging.getLogger("libremote.server")

MAX_TENANTS = 256
OTHER_TENANTS = "_other"
#: Points of the dashboard's history (one per publish: 10 minutes at the default 2 s).
HISTORY_POINTS = 300
#: A spill storm: spill and restore traffic of a device, over :data:`STORM_WINDOW_S`, at least
#: this many times its resident budget (the whole budget moved every 5 s or faster).
STORM_WINDOW_S = 10.0
STORM_BUDGET_TURNS = 2.0
#: The counters a session reports (worker/session.py ``figures``) that a tenant's totals keep.
_SUMMED = ("ops", "batches", "device_time_s", "bytes_in", "bytes_out", "graphs_defined", "graph_runs",
           "step_replays", "cuda_graph_replays")


class FrontCounters:
    """Counters the front's loop keeps (only the loop writes them; :meth:`copy` is published)."""

    def __init__(self) -> None:
        self.started = time.time()
        self.messages: dict[str, int] = {}
        self.rejected: dict[str, int] = {}
        self.reconnects = 0
        self.admissions: dict[tuple[str, str], int] = {}  # (tenant, admitted|queued|refused) -> n
        self.refusals: dict[str, int] = {}  # reason -> n
        self.waits: dict[str, list[float]] = {}  # tenant -> [admissions, seconds waited]
        self.ended: dict[str, dict[str, Any]] = {}  # tenant -> totals of its ended sessions
        self.spill_storms: dict[int, int] = {}
        self.quota_changes = 0
        self._clients: collections.OrderedDict[tuple[Any, Any], None] = collections.OrderedDict()
        self._tenants: set[str] = set()

    def tenant(self, name: str) -> str:
        """``name``, or ``_other`` once :data:`MAX_TENANTS` names are counted."""
        if name in self._tenants:
            return name
        if len(self._tenants) >= MAX_TENANTS:
            return OTHER_TENANTS
        self._tenants.add(name)
        return name

    def message(self, kind: str) -> None:
        self.messages[kind] = self.messages.get(kind, 0) + 1

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def hello(self, info: dict[str, Any]) -> None:
        """A client said HELLO: a reconnect if the same process (host, pid) had a session before."""
        key = (info.get("host"), info.get("pid"))
        if key == (None, None):
            return
        if key in self._clients:
            self.reconnects += 1
            self._clients.move_to_end(key)
        else:
            self._clients[key] = None
            while len(self._clients) > 4096:
                self._clients.popitem(last=False)

    def refused(self, tenant: str | None, reason: str) -> None:
        """A client refused (``tenant``: when it is known by then)."""
        reason = reason if reason in REFUSAL_REASONS else "other"
        self.refusals[reason] = self.refusals.get(reason, 0) + 1
        if tenant is not None:
            self.admission(tenant, "refused")

    def admission(self, tenant: str, outcome: str, *, waited_s: float | None = None) -> None:
        key = (self.tenant(tenant), outcome)
        self.admissions[key] = self.admissions.get(key, 0) + 1
        if waited_s is not None:
            wait = self.waits.setdefault(key[0], [0, 0.0])
            wait[0] += 1
            wait[1] += waited_s

    def session_ended(self, session: FrontSession) -> None:
        """Fold an ended session's last figures into its tenant's totals."""
        totals = self.ended.setdefault(self.tenant(session.tenant.name), {"sessions": 0, "errors": {}})
        totals["sessions"] += 1
        _add_figures(totals, session.stats)

    def copy(self) -> dict[str, Any]:
        return {
            "started": self.started, "messages": dict(self.messages), "rejected": dict(self.rejected),
            "reconnects": self.reconnects, "refusals": dict(self.refusals), "quota_changes": self.quota_changes,
            "admissions": [[tenant, outcome, n] for (tenant, outcome), n in self.admissions.items()],
            "waits": {tenant: list(wait) for tenant, wait in self.waits.items()},
            "ended": {tenant: {**totals, "errors": dict(totals["errors"])} for tenant, totals in self.ended.items()},
            "spill_storms": {str(device): n for device, n in self.spill_storms.items()},
        }


def _add_figures(totals: dict[str, Any], figures: dict[str, Any]) -> None:
    for key in _SUMMED:
        value = figures.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            totals[key] = totals.get(key, 0) + value
    errors = figures.get("errors")
    if isinstance(errors, dict):
        for kind, count in errors.items():
            if isinstance(count, int) and isinstance(kind, str):
                totals["errors"][kind] = totals["errors"].get(kind, 0) + count


class Front(Protocol):
    """What telemetry reads of the front (front.py's ``Front`` is one)."""

    devices: list[FrontDevice]
    sessions: dict[bytes, FrontSession]
    workers: WorkerPool
    pool: PoolConfig
    draining: str | None


class Telemetry:
    """The front's side of observability: counters, periodic figures, health, the snapshot."""

    def __init__(self, front: Front, config: TelemetryConfig, hardware: list[dict[str, Any]]) -> None:
        self.front = front
        self.config = config
        self.counters = FrontCounters()
        refs = [DeviceRef(device.index, device.spec, (hardware[device.index] or {}).get("uuid")
                          if device.index < len(hardware) else None) for device in front.devices]
        self.health = HealthSampler(refs, interval_s=config.health_interval_s,
                                    max_temperature_c=config.max_temperature_c, inject_path=config.health_inject)
        self.polling = False  # a periodic REPORT round is in flight
        self.polls = 0
        self._next_poll = 0.0
        self._spill_marks: dict[int, collections.deque[tuple[float, float]]] = {}
        self._storming: set[int] = set()
        self._history: collections.deque[dict[str, Any]] = collections.deque(maxlen=HISTORY_POINTS)
        self._health_seen = 0
        self._unhealthy_logged: dict[int, str] = {}
        #: The published snapshot (replaced whole; the HTTP thread reads only this reference).
        self.latest: dict[str, Any] | None = None
        #: (ready, why), published by the loop every housekeeping turn for /readyz.
        self.ready_state: tuple[bool, str] = (False, "starting")
        #: Loop liveness for /healthz: when the loop last did its housekeeping (monotonic).
        self.loop_seen = time.monotonic()
        self._worker_rejected: dict[str, dict[str, int]] = {}
        self._retired_rejected: dict[str, int] = {}
        self.http: Any = None

    def start(self) -> None:
        self.health.start()
        self.apply_health()
        self.ready_state = self.readiness()
        if self.config.listen:
            try:
                from .http import MetricsServer

                self.http = MetricsServer(self, self.config)
            except ImportError as exc:
                raise ValueError(f"--metrics-listen needs prometheus-client ({exc}): pip install 'libremote[metrics]'") from exc
            except OSError as exc:
                raise ValueError(f"--metrics-listen {self.config.listen}: {exc}") from None
            self.http.start()

    def stop(self) -> None:
        if self.http is not None:
            self.http.stop()
        self.health.stop()

    @property
    def endpoint(self) -> str | None:
        return self.http.url if self.http is not None else None

    # ------------------------------------------------------------------------------------------
    # The loop's side
    # ------------------------------------------------------------------------------------------
    def housekeeping(self, now: float) -> bool:
        """The loop's turn (every 0.25 s): apply a new health sample, publish readiness and
        liveness; whether to ask the workers for figures now."""
        if self.health.samples != self._health_seen:
            self._health_seen = self.health.samples
            self.apply_health()
        self.ready_state = self.readiness()
        self.loop_seen = now
        return self.due(now)

    def latest_readiness(self) -> tuple[bool, str]:
        return self.ready_state

    def due(self, now: float) -> bool:
        """Whether the loop should ask its workers for figures now (housekeeping)."""
        if self.polling or now < self._next_poll:
            return False
        self._next_poll = now + self.config.interval_s
        self.polling = True
        return True

    def apply_health(self) -> None:
        """Mark the devices the last health sample found unhealthy (the loop, in housekeeping):
        admission places no new session on them; the change is logged once."""
        snapshot = self.health.latest
        for device in self.front.devices:
            row = snapshot["devices"].get(device.index) or {}
            reasons = row.get("reasons") or []
            why = "; ".join(reason["message"] for reason in reasons) or None
            if why != self._unhealthy_logged.get(device.index):
                if why:
                    log.error("device %d (%s) is unhealthy and takes no new sessions: %s", device.index, device.spec, why,
                              extra={"event": "device_unhealthy", "device": device.index,
                                     "reasons": [reason["kind"] for reason in reasons]})
                elif device.index in self._unhealthy_logged:
                    log.warning("device %d (%s) is healthy again and takes new sessions", device.index, device.spec,
                                extra={"event": "device_healthy", "device": device.index})
                if why:
                    self._unhealthy_logged[device.index] = why
                else:
                    self._unhealthy_logged.pop(device.index, None)
            device.unhealthy = why

    def publish(self, report: dict[str, Any], reports: dict[str, dict[str, Any]]) -> None:
        """Build and publish the snapshot from a full status report (status.py), the workers'
        REPORTs behind it, and the counters."""
        self.polling = False
        for worker_id, worker_report in reports.items():
            rejected = worker_report.get("rejected")
            if isinstance(rejected, dict):
                self._worker_rejected[worker_id] = {str(k): int(v) for k, v in rejected.items() if isinstance(v, int)}
        for worker_id in [w for w in self._worker_rejected if w not in self.front.workers.workers]:
            for reason, count in self._worker_rejected.pop(worker_id).items():
                self._retired_rejected[reason] = self._retired_rejected.get(reason, 0) + count
        worker_rejected = dict(self._retired_rejected)
        for rejected in self._worker_rejected.values():
            for reason, count in rejected.items():
                worker_rejected[reason] = worker_rejected.get(reason, 0) + count
        self.polls += 1
        now = time.time()
        health = self.health.latest
        self._watch_spills(report, time.monotonic())
        tenants = self._tenants(report)
        point = {"t": now, "sessions": len(report["sessions"]), "waiting": len(report["waiting"]),
                 "devices": [{"index": d["index"], "memory_used": d["memory_used"], "memory_total": d["memory_total"],
                              "utilization": d["utilization"], "busy_s": d["busy_s"],
                              "spilled": (d.get("residency") or {}).get("spilled_bytes", 0)}
                             for d in report["devices"]],
                 "tenants": {name: row["sessions"] for name, row in tenants.items()}}
        self._history.append(point)
        authenticator = getattr(self.front, "_authenticator", None)
        known_keys = getattr(authenticator, "known_keys", None)
        if known_keys is not None:
            self.counters.rejected["unknown_key"] = known_keys.refused
        ready, why = self.readiness()
        self.latest = {
            "time": now, "status": report, "counters": self.counters.copy(), "tenants": tenants, "health": health,
            "ready": ready, "ready_reason": why, "polls": self.polls, "history": tuple(self._history),
            "worker_rejected": worker_rejected,
        }

    def readiness(self) -> tuple[bool, str]:
        """Whether the daemon takes new sessions (Kubernetes' readiness): not while draining, not
        when no device is healthy, not when no new worker can start."""
        front = self.front
        if front.draining:
            return False, f"draining: {front.draining}"
        if all(device.unhealthy for device in front.devices):
            return False, "no healthy device: " + "; ".join(f"device {d.index}: {d.unhealthy}" for d in front.devices)
        if front.workers.zygote_fd < 0:
            return False, "the worker zygote exited: no new session can start (restart the daemon)"
        return True, "ready"

    def _tenants(self, report: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Per tenant: live sessions' figures plus ended sessions' totals, quota, queue."""
        counters = self.counters
        rows: dict[str, dict[str, Any]] = {}

        def row(name: str) -> dict[str, Any]:
            key = counters.tenant(name)
            if key not in rows:
                tenant = self.front.pool.tenant_named(name) if key != "_other" else None
                rows[key] = {"sessions": 0, "waiting": 0, "memory_used": 0, "memory_spilled": 0,
                             "memory_quota": tenant.memory_quota if tenant is not None else self.front.pool.default_memory_quota,
                             "errors": {}, "sessions_ended": 0, **dict.fromkeys(_SUMMED, 0)}
            return rows[key]

        for session in report["sessions"]:
            tenant = row(session["tenant"])
            tenant["sessions"] += 1
            tenant["memory_used"] += session.get("memory_allocated", 0)
            tenant["memory_spilled"] += session.get("memory_spilled", 0)
            _add_figures(tenant, session)
        for waiter in report["waiting"]:
            row(waiter["tenant"])["waiting"] += 1
        for name, totals in counters.ended.items():
            tenant = row(name)
            tenant["sessions_ended"] += totals["sessions"]
            _add_figures(tenant, totals)
        for tenant_name in getattr(self.front.pool, "tenants", {}) or {}:
            row(tenant_name)
        for (name, _), _count in counters.admissions.items():
            row(name)
        return rows

    def _watch_spills(self, report: dict[str, Any], now: float) -> None:
        """Log a spill storm (and count it) when a device's spill and restore traffic over the
        last :data:`STORM_WINDOW_S` reaches :data:`STORM_BUDGET_TURNS` times its budget."""
        for device in report["devices"]:
            residency = device.get("residency")
            if not residency:
                continue
            index = device["index"]
            moved = float(residency.get("bytes_evicted", 0) + residency.get("bytes_restored", 0))
            marks = self._spill_marks.setdefault(index, collections.deque())
            marks.append((now, moved))
            while len(marks) > 1 and now - marks[1][0] >= STORM_WINDOW_S:
                marks.popleft()
            budget = residency.get("device_budget") or 0
            window = now - marks[0][0]
            traffic = moved - marks[0][1]
            storming = budget > 0 and window >= STORM_WINDOW_S / 2 and traffic >= STORM_BUDGET_TURNS * budget
            if storming and index not in self._storming:
                self._storming.add(index)
                self.counters.spill_storms[index] = self.counters.spill_storms.get(index, 0) + 1
                sessions = sorted(self.front.sessions.values(), key=lambda s: -s.stats.get("memory_spilled", 0))
                log.warning(
                    "spill storm on device %d: %.0f MiB spilled and restored in %.0f s (budget %.0f MiB); the sessions "
                    "with the most spilled: %s", index, traffic / 2**20, window, budget / 2**20,
                    ", ".join(f"{s.id} ({s.tenant.name}, {s.stats.get('memory_spilled', 0) / 2**20:.0f} MiB)"
                              for s in sessions[:3] if any(d.index == index for d in s.devices)) or "none",
                    extra={"event": "spill_storm", "device": index, "bytes_moved": traffic, "window_s": window,
                           "budget_bytes": budget})
            elif not storming and index in self._storming and traffic < budget:
                self._storming.discard(index)
                log.info("spill storm on device %d is over", index, extra={"event": "spill_storm_over", "device": index})
