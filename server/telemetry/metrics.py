"""The daemon's Prometheus metrics, rendered from the front's published snapshot.

Every metric is declared in :data:`METRICS` (name, type, labels, help); docs/METRICS.md is the
table of them (``python -m libremote_server.telemetry.metrics`` prints it) and
tests/test_metrics.py fails when a documented name is no longer exposed, or an exposed one is not
documented. Names follow Prometheus' conventions and node_exporter's and NVIDIA's DCGM exporter's
habits: a ``libremote_`` prefix, base units in the name (``_bytes``, ``_seconds``, ``_celsius``,
``_watts``, ``_hertz``, ``_ratio`` for 0..1), ``_total`` on counters, and labels with bounded values
only (device indices, tenants as configured, live sessions, fixed sets of kinds and reasons;
never an op name or anything else a client chooses freely).

The collector (:class:`SnapshotCollector`) reads :attr:`Telemetry.latest` (one reference, replaced
whole by the front's loop) when scraped, so a scrape costs the loop nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from libremote_wire import __version__
from libremote_wire.messages import PROTOCOL_VERSION, ErrorKind

from .health import REASON_KINDS, THROTTLE_REASONS

#: Refusal reasons (the label values of libremote_refusals_total).
REFUSAL_REASONS = ("protocol", "policy", "quota", "queue_full", "draining", "unhealthy", "other")


class HasLatest(Protocol):
    @property
    def latest(self) -> dict[str, Any] | None: ...


class Published(Protocol):
    """What the metrics are read from: the snapshot the front's loop publishes (collect.py's
    ``Telemetry`` is one), so this module needs nothing of how it is made."""

    latest: dict[str, Any] | None

    @property
    def health(self) -> HasLatest: ...

    def latest_readiness(self) -> tuple[bool, str]: ...


@dataclass(frozen=True)
class MetricSpec:
    name: str  # as exposed (counters with _total)
    type: str  # counter, gauge, info, summary
    labels: tuple[str, ...]
    help: str
    #: Where it appears: "daemon" (always), "device", "tenant", "session" (while one lives),
    #: "residency" (with --host-spill), "gpu" (NVML), "host", "thermal" (hosts with thermal zones).
    scope: str


def _m(name: str, kind: str, labels: str, help: str, scope: str) -> MetricSpec:
    return MetricSpec(name, kind, tuple(labels.split()) if labels else (), help, scope)


METRICS: tuple[MetricSpec, ...] = (
    # The daemon
    _m("libremote_build_info", "gauge", "version protocol torch", "1, labelled with the daemon's libremote version, protocol and the workers' torch", "daemon"),
    _m("libremote_start_time_seconds", "gauge", "", "when the daemon started (Unix time)", "daemon"),
    _m("libremote_ready", "gauge", "", "1 while the daemon takes new sessions (not draining, a healthy device, workers can start)", "daemon"),
    _m("libremote_draining", "gauge", "", "1 while an operator has the daemon draining (no new sessions)", "daemon"),
    _m("libremote_snapshot_timestamp_seconds", "gauge", "", "when the figures behind this scrape were gathered (Unix time)", "daemon"),
    _m("libremote_front_messages_total", "counter", "kind", "messages the front took, by kind (hello, ping, bye, status, admin, batch)", "daemon"),
    _m("libremote_rejected_messages_total", "counter", "where reason", "messages refused before or instead of running: malformed (fuzz-style input), over a bound, another key's session, a daemon failure, an unknown CURVE key, a PULL without a live export (pull)", "daemon"),
    _m("libremote_reconnects_total", "counter", "", "HELLOs from a client process that had a session before", "daemon"),
    _m("libremote_refusals_total", "counter", "reason", "clients refused at admission, by reason (protocol, policy, quota, queue_full, draining, unhealthy, other)", "daemon"),
    _m("libremote_quota_changes_total", "counter", "", "admin changes of quotas, weights or priorities", "daemon"),
    _m("libremote_errors_total", "counter", "kind", "failed commands of every session, ended ones included, by kind (op, oom, refused, handle, protocol, session)", "daemon"),
    _m("libremote_sessions", "gauge", "", "open sessions", "daemon"),
    _m("libremote_queue_length", "gauge", "", "clients waiting in the admission queue", "daemon"),
    _m("libremote_queue_oldest_wait_seconds", "gauge", "", "how long the first client in the admission queue has waited (0: none waits)", "daemon"),
    _m("libremote_workers", "gauge", "state", "worker processes, by state (starting, ready, stopping)", "daemon"),
    _m("libremote_worker_crashes_total", "counter", "", "worker processes that ended unexpectedly (crash, killed, op time limit)", "daemon"),
    _m("libremote_graph_cache_hits_total", "counter", "kind", "graph calls served by a graph the session had defined (kind graph: RUN_GRAPH; step: captured-step REPLAY; cuda_graph: launched as a CUDA graph)", "daemon"),
    _m("libremote_graph_cache_misses_total", "counter", "", "graphs defined (each a trace shipped by a client)", "daemon"),
    _m("libremote_status_polls_total", "counter", "", "rounds of figures gathered from the workers", "daemon"),
    # Devices
    _m("libremote_device_info", "gauge", "device spec name", "1 per pool device, labelled with its spec and model name", "device"),
    _m("libremote_device_memory_used_bytes", "gauge", "device", "bytes the sessions on the device hold (their tensors' storages)", "device"),
    _m("libremote_device_memory_reserved_bytes", "gauge", "device", "bytes held for them: the caching allocators' reservations on a GPU, what is resident under oversubscription", "device"),
    _m("libremote_device_memory_spilled_bytes", "gauge", "device", "bytes of the device's sessions spilled to host memory", "device"),
    _m("libremote_device_memory_total_bytes", "gauge", "device", "the device's memory (the pool's budget under oversubscription)", "device"),
    _m("libremote_device_busy_seconds_total", "counter", "device", "device time used by sessions: its rate is the utilization (device seconds per second)", "device"),
    _m("libremote_device_utilization_ratio", "gauge", "device", "device time per second over the workers' last window (0..1)", "device"),
    _m("libremote_device_queued_batches", "gauge", "device", "batches queued on the device's sessions, waiting to run", "device"),
    _m("libremote_device_sessions", "gauge", "device", "sessions placed on the device", "device"),
    _m("libremote_device_healthy", "gauge", "device", "1 while the device is healthy and takes new sessions", "device"),
    _m("libremote_device_unhealthy", "gauge", "device reason", "1 for each reason the device is unhealthy (ecc, row_remap, xid, temperature, lost, injected)", "device"),
    # Residency (oversubscription)
    _m("libremote_device_memory_budget_bytes", "gauge", "device", "bytes the pool may keep resident on the device (--device-memory)", "residency"),
    _m("libremote_device_host_spill_limit_bytes", "gauge", "device", "host memory for the device's spilled storages (--host-spill)", "residency"),
    _m("libremote_spill_bytes_total", "counter", "device", "bytes copied off the device to host memory", "residency"),
    _m("libremote_restore_bytes_total", "counter", "device", "bytes copied back to the device (prefetches included)", "residency"),
    _m("libremote_prefetch_bytes_total", "counter", "device", "bytes restored ahead of use", "residency"),
    _m("libremote_spill_discarded_bytes_total", "counter", "device", "bytes of dead storages dropped without a copy", "residency"),
    _m("libremote_spill_seconds_total", "counter", "device", "time spent copying storages off the device", "residency"),
    _m("libremote_restore_seconds_total", "counter", "device", "time spent copying storages back", "residency"),
    _m("libremote_spills_total", "counter", "device", "storages spilled", "residency"),
    _m("libremote_restores_total", "counter", "device", "storages restored", "residency"),
    _m("libremote_spill_storms_total", "counter", "device", "spill storms: spill and restore traffic of twice the budget within 10 s", "residency"),
    # Tenants
    _m("libremote_tenant_sessions", "gauge", "tenant", "the tenant's open sessions", "tenant"),
    _m("libremote_tenant_waiting", "gauge", "tenant", "the tenant's clients in the admission queue", "tenant"),
    _m("libremote_tenant_memory_used_bytes", "gauge", "tenant", "bytes the tenant's sessions hold", "tenant"),
    _m("libremote_tenant_memory_spilled_bytes", "gauge", "tenant", "bytes of the tenant's sessions spilled to host memory", "tenant"),
    _m("libremote_tenant_memory_quota_bytes", "gauge", "tenant", "the tenant's memory quota (for its sessions together)", "tenant"),
    _m("libremote_tenant_device_seconds_total", "counter", "tenant", "device time the tenant's sessions used", "tenant"),
    _m("libremote_tenant_ops_total", "counter", "tenant", "ops the tenant's sessions ran", "tenant"),
    _m("libremote_tenant_received_bytes_total", "counter", "tenant", "tensor bytes the tenant's clients sent", "tenant"),
    _m("libremote_tenant_sent_bytes_total", "counter", "tenant", "tensor bytes sent back to the tenant's clients", "tenant"),
    _m("libremote_tenant_errors_total", "counter", "tenant kind", "failed commands of the tenant's sessions, by kind", "tenant"),
    _m("libremote_tenant_oom_errors_total", "counter", "tenant", "out-of-memory errors (quota or device) of the tenant's sessions", "tenant"),
    _m("libremote_tenant_admissions_total", "counter", "tenant outcome", "the tenant's clients admitted at once, queued first, or refused", "tenant"),
    _m("libremote_tenant_admission_wait_seconds", "summary", "tenant", "time the tenant's admitted clients waited in the queue (_count: admissions)", "tenant"),
    _m("libremote_tenant_sessions_ended_total", "counter", "tenant", "the tenant's sessions that ended", "tenant"),
    # Sessions
    _m("libremote_session_info", "gauge", "session tenant device priority", "1 per open session", "session"),
    _m("libremote_session_memory_used_bytes", "gauge", "session tenant", "bytes the session holds", "session"),
    _m("libremote_session_memory_peak_bytes", "gauge", "session tenant", "the most it held", "session"),
    _m("libremote_session_memory_spilled_bytes", "gauge", "session tenant", "its bytes spilled to host memory", "session"),
    _m("libremote_session_memory_quota_bytes", "gauge", "session tenant", "its memory quota", "session"),
    _m("libremote_session_device_seconds_total", "counter", "session tenant", "device time it used", "session"),
    _m("libremote_session_ops_total", "counter", "session tenant", "ops it ran", "session"),
    _m("libremote_session_received_bytes_total", "counter", "session tenant", "tensor bytes its client sent", "session"),
    _m("libremote_session_sent_bytes_total", "counter", "session tenant", "tensor bytes sent back to its client", "session"),
    _m("libremote_session_errors_total", "counter", "session tenant kind", "its failed commands, by kind (oom: out of memory)", "session"),
    _m("libremote_session_queued_batches", "gauge", "session tenant", "its batches waiting to run", "session"),
    _m("libremote_session_age_seconds", "gauge", "session tenant", "how long it has been open", "session"),
    # GPUs (NVML)
    _m("libremote_gpu_temperature_celsius", "gauge", "device uuid", "GPU temperature (DCGM_FI_DEV_GPU_TEMP)", "gpu"),
    _m("libremote_gpu_temperature_limit_celsius", "gauge", "device uuid", "temperature at which the device counts as unhealthy", "gpu"),
    _m("libremote_gpu_fan_speed_ratio", "gauge", "device uuid", "fan speed, 0..1 of its maximum (absent on passively cooled GPUs)", "gpu"),
    _m("libremote_gpu_power_watts", "gauge", "device uuid", "power draw (DCGM_FI_DEV_POWER_USAGE)", "gpu"),
    _m("libremote_gpu_power_limit_watts", "gauge", "device uuid", "enforced power limit", "gpu"),
    _m("libremote_gpu_sm_clock_hertz", "gauge", "device uuid", "SM clock (DCGM_FI_DEV_SM_CLOCK)", "gpu"),
    _m("libremote_gpu_memory_clock_hertz", "gauge", "device uuid", "memory clock (DCGM_FI_DEV_MEM_CLOCK)", "gpu"),
    _m("libremote_gpu_utilization_ratio", "gauge", "device uuid", "time a kernel ran, 0..1, as NVML samples it (DCGM_FI_DEV_GPU_UTIL), all processes", "gpu"),
    _m("libremote_gpu_memory_utilization_ratio", "gauge", "device uuid", "time memory was read or written, 0..1 (DCGM_FI_DEV_MEM_COPY_UTIL)", "gpu"),
    _m("libremote_gpu_memory_used_bytes", "gauge", "device uuid", "device memory in use by all processes, as NVML sees it", "gpu"),
    _m("libremote_gpu_ecc_errors_total", "counter", "device uuid type", "ECC errors since the driver loaded (type corrected or uncorrected)", "gpu"),
    _m("libremote_gpu_energy_joules_total", "counter", "device uuid", "energy used since the driver loaded", "gpu"),
    _m("libremote_gpu_throttled", "gauge", "device uuid reason", "1 for each clock throttle reason active now (sw_power_cap, hw_slowdown, sw_thermal_slowdown, ...)", "gpu"),
    _m("libremote_gpu_xid_events_total", "counter", "device uuid xid", "XID errors NVML reported since the daemon started, by XID", "gpu"),
    # The host
    _m("libremote_host_load1", "gauge", "", "the host's 1-minute load average", "host"),
    _m("libremote_host_cpus", "gauge", "", "the host's logical CPUs", "host"),
    _m("libremote_host_cpu_utilization_ratio", "gauge", "", "the host's CPU utilization between the last two health samples (since boot at the first), 0..1", "host"),
    _m("libremote_host_memory_available_bytes", "gauge", "", "the host's available memory (MemAvailable)", "host"),
    _m("libremote_host_memory_total_bytes", "gauge", "", "the host's memory", "host"),
    _m("libremote_host_temperature_celsius", "gauge", "", "the hottest of the host's thermal zones", "thermal"),
    _m("libremote_health_sample_timestamp_seconds", "gauge", "source", "when devices and host were last sampled (source nvml or host)", "host"),
)
BY_NAME = {spec.name: spec for spec in METRICS}
ERROR_KINDS = tuple(kind.value for kind in ErrorKind)


def _labels(spec: MetricSpec) -> list[str]:
    return list(spec.labels)


class _Families:
    """Metric families being filled from one snapshot (prometheus_client objects)."""

    def __init__(self) -> None:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            SummaryMetricFamily,
        )

        self._kinds = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "summary": SummaryMetricFamily}
        self.families: dict[str, Any] = {}

    def add(self, name: str, labels: tuple[str, ...] | list[str], value: Any, **extra: Any) -> None:
        spec = BY_NAME[name]
        if value is None and spec.type != "summary":
            return  # (not available: the series is absent, as node_exporter does)
        family = self.families.get(name)
        if family is None:
            exposed = name[: -len("_total")] if spec.type == "counter" else name
            family = self.families[name] = self._kinds[spec.type](exposed, spec.help, labels=_labels(spec))
        if spec.type == "summary":
            family.add_metric(list(labels), count_value=extra["count"], sum_value=extra["sum"])
        else:
            family.add_metric(list(labels), float(value))


def families(snapshot: dict[str, Any] | None, *, health: dict[str, Any] | None = None,
             ready: tuple[bool, str] | None = None) -> Iterator[Any]:
    """Every metric family of a published snapshot (``health`` and ``ready`` may be fresher)."""
    out = _Families()
    if snapshot is None:
        return iter(())
    status, counters = snapshot["status"], snapshot["counters"]
    health = health or snapshot["health"]
    daemon = status["daemon"]
    ready_now, _ = ready or (snapshot["ready"], snapshot["ready_reason"])
    add = out.add
    add("libremote_build_info", [__version__, str(PROTOCOL_VERSION), str(daemon.get("torch"))], 1)
    add("libremote_start_time_seconds", [], counters["started"])
    add("libremote_ready", [], 1 if ready_now else 0)
    add("libremote_draining", [], 1 if daemon.get("draining") else 0)
    add("libremote_snapshot_timestamp_seconds", [], snapshot["time"])
    for kind in ("hello", "ping", "bye", "status", "admin", "batch"):
        add("libremote_front_messages_total", [kind], counters["messages"].get(kind, 0))
    rejected_front = counters["rejected"]
    for reason in ("malformed", "unknown_key", "other_owner", "failure"):
        add("libremote_rejected_messages_total", ["front", reason], rejected_front.get(reason, 0))
    rejected_workers = snapshot.get("worker_rejected") or {}
    for reason in ("malformed", "limit", "other_owner", "failure", "pull", "stripe"):
        add("libremote_rejected_messages_total", ["worker", reason], rejected_workers.get(reason, 0))
    add("libremote_reconnects_total", [], counters["reconnects"])
    for reason in REFUSAL_REASONS:
        add("libremote_refusals_total", [reason], counters["refusals"].get(reason, 0))
    add("libremote_quota_changes_total", [], counters["quota_changes"])
    tenants = snapshot["tenants"]
    totals_errors: dict[str, int] = {}
    for tenant in tenants.values():
        for kind, count in tenant["errors"].items():
            totals_errors[kind] = totals_errors.get(kind, 0) + count
    for kind in ERROR_KINDS:
        add("libremote_errors_total", [kind], totals_errors.get(kind, 0))
    add("libremote_sessions", [], len(status["sessions"]))
    add("libremote_queue_length", [], len(status["waiting"]))
    add("libremote_queue_oldest_wait_seconds", [], max((w["waited_s"] for w in status["waiting"]), default=0.0))
    states: dict[str, int] = {"starting": 0, "ready": 0, "stopping": 0}
    for worker in status["workers"]:
        states[worker["state"]] = states.get(worker["state"], 0) + 1
    for state, count in states.items():
        add("libremote_workers", [state], count)
    add("libremote_worker_crashes_total", [], daemon.get("worker_crashes", 0))
    add("libremote_graph_cache_hits_total", ["graph"], sum(t["graph_runs"] for t in tenants.values()))
    add("libremote_graph_cache_hits_total", ["step"], sum(t["step_replays"] for t in tenants.values()))
    add("libremote_graph_cache_hits_total", ["cuda_graph"], sum(t["cuda_graph_replays"] for t in tenants.values()))
    add("libremote_graph_cache_misses_total", [], sum(t["graphs_defined"] for t in tenants.values()))
    add("libremote_status_polls_total", [], snapshot["polls"])

    queued: dict[int, int] = {}
    for session in status["sessions"]:
        queued[session["device"]] = queued.get(session["device"], 0) + session.get("queued_batches", 0)
    storms = counters["spill_storms"]
    for device in status["devices"]:
        index = str(device["index"])
        add("libremote_device_info", [index, device["device"], device["name"]], 1)
        add("libremote_device_memory_used_bytes", [index], device["memory_used"])
        add("libremote_device_memory_reserved_bytes", [index], device.get("memory_reserved", device["memory_used"]))
        residency = device.get("residency") or {}
        add("libremote_device_memory_spilled_bytes", [index], residency.get("spilled_bytes", 0))
        add("libremote_device_memory_total_bytes", [index], device["memory_total"])
        add("libremote_device_busy_seconds_total", [index], device["busy_s"])
        add("libremote_device_utilization_ratio", [index], device["utilization"])
        add("libremote_device_queued_batches", [index], queued.get(device["index"], 0))
        add("libremote_device_sessions", [index], device["sessions"])
        row = (health.get("devices") or {}).get(device["index"]) or {}
        reasons = {reason["kind"] for reason in row.get("reasons") or ()}
        add("libremote_device_healthy", [index], 0 if reasons else 1)
        for kind in REASON_KINDS:
            add("libremote_device_unhealthy", [index, kind], 1 if kind in reasons else 0)
        if residency:
            add("libremote_device_memory_budget_bytes", [index], residency.get("device_budget"))
            add("libremote_device_host_spill_limit_bytes", [index], residency.get("host_spill_limit"))
            add("libremote_spill_bytes_total", [index], residency.get("bytes_evicted", 0))
            add("libremote_restore_bytes_total", [index], residency.get("bytes_restored", 0))
            add("libremote_prefetch_bytes_total", [index], residency.get("bytes_prefetched", 0))
            add("libremote_spill_discarded_bytes_total", [index], residency.get("bytes_discarded", 0))
            add("libremote_spill_seconds_total", [index], residency.get("evict_seconds", 0.0))
            add("libremote_restore_seconds_total", [index], residency.get("restore_seconds", 0.0))
            add("libremote_spills_total", [index], residency.get("evictions", 0))
            add("libremote_restores_total", [index], residency.get("restores", 0))
            add("libremote_spill_storms_total", [index], storms.get(index, 0))
        if row.get("source") == "nvml":
            _gpu(add, index, row)

    admissions: dict[tuple[str, str], int] = {(tenant, outcome): n for tenant, outcome, n in counters["admissions"]}
    for name, tenant in sorted(tenants.items()):
        add("libremote_tenant_sessions", [name], tenant["sessions"])
        add("libremote_tenant_waiting", [name], tenant["waiting"])
        add("libremote_tenant_memory_used_bytes", [name], tenant["memory_used"])
        add("libremote_tenant_memory_spilled_bytes", [name], tenant["memory_spilled"])
        add("libremote_tenant_memory_quota_bytes", [name], tenant["memory_quota"])
        add("libremote_tenant_device_seconds_total", [name], tenant["device_time_s"])
        add("libremote_tenant_ops_total", [name], tenant["ops"])
        add("libremote_tenant_received_bytes_total", [name], tenant["bytes_in"])
        add("libremote_tenant_sent_bytes_total", [name], tenant["bytes_out"])
        for kind in ERROR_KINDS:
            add("libremote_tenant_errors_total", [name, kind], tenant["errors"].get(kind, 0))
        add("libremote_tenant_oom_errors_total", [name], tenant["errors"].get("oom", 0))
        for outcome in ("admitted", "queued", "refused"):
            add("libremote_tenant_admissions_total", [name, outcome], admissions.get((name, outcome), 0))
        count, seconds = counters["waits"].get(name, [0, 0.0])
        add("libremote_tenant_admission_wait_seconds", [name], None, count=count, sum=seconds)
        add("libremote_tenant_sessions_ended_total", [name], tenant["sessions_ended"])

    for session in status["sessions"]:
        labels = [session["session"], session["tenant"]]
        add("libremote_session_info", [*labels, str(session["device"]), session["priority"]], 1)
        add("libremote_session_memory_used_bytes", labels, session.get("memory_allocated", 0))
        add("libremote_session_memory_peak_bytes", labels, session.get("memory_peak", 0))
        add("libremote_session_memory_spilled_bytes", labels, session.get("memory_spilled", 0))
        add("libremote_session_memory_quota_bytes", labels, session.get("memory_quota", 0))
        add("libremote_session_device_seconds_total", labels, session.get("device_time_s", 0.0))
        add("libremote_session_ops_total", labels, session.get("ops", 0))
        add("libremote_session_received_bytes_total", labels, session.get("bytes_in", 0))
        add("libremote_session_sent_bytes_total", labels, session.get("bytes_out", 0))
        errors = session.get("errors") or {}
        for kind in ERROR_KINDS:
            add("libremote_session_errors_total", [*labels, kind], errors.get(kind, 0))
        add("libremote_session_queued_batches", labels, session.get("queued_batches", 0))
        add("libremote_session_age_seconds", labels, session.get("age_s", 0.0))

    host = health.get("host") or {}
    add("libremote_host_load1", [], host.get("load1"))
    add("libremote_host_cpus", [], host.get("cpus"))
    add("libremote_host_cpu_utilization_ratio", [], host.get("cpu_utilization"))
    add("libremote_host_memory_available_bytes", [], host.get("memory_available_bytes"))
    add("libremote_host_memory_total_bytes", [], host.get("memory_total_bytes"))
    add("libremote_host_temperature_celsius", [], host.get("temperature_c"))
    add("libremote_health_sample_timestamp_seconds", [str(health.get("source", "host"))], health.get("time"))
    return iter(out.families.values())


def _gpu(add: Any, index: str, row: dict[str, Any]) -> None:
    labels = [index, str(row.get("uuid") or "")]
    add("libremote_gpu_temperature_celsius", labels, row.get("temperature_c"))
    add("libremote_gpu_temperature_limit_celsius", labels, row.get("temperature_limit_c"))
    add("libremote_gpu_fan_speed_ratio", labels, row.get("fan_ratio"))
    add("libremote_gpu_power_watts", labels, row.get("power_w"))
    add("libremote_gpu_power_limit_watts", labels, row.get("power_limit_w"))
    add("libremote_gpu_sm_clock_hertz", labels, row.get("sm_clock_hz"))
    add("libremote_gpu_memory_clock_hertz", labels, row.get("memory_clock_hz"))
    add("libremote_gpu_utilization_ratio", labels, row.get("utilization"))
    add("libremote_gpu_memory_utilization_ratio", labels, row.get("memory_utilization"))
    add("libremote_gpu_memory_used_bytes", labels, row.get("memory_used_bytes"))
    add("libremote_gpu_ecc_errors_total", [*labels, "corrected"], row.get("ecc_corrected"))
    add("libremote_gpu_ecc_errors_total", [*labels, "uncorrected"], row.get("ecc_uncorrected"))
    add("libremote_gpu_energy_joules_total", labels, row.get("energy_j"))
    throttles = row.get("throttle_reasons")
    if throttles is not None:
        for reason in THROTTLE_REASONS.values():
            add("libremote_gpu_throttled", [*labels, reason], 1 if reason in throttles else 0)
    for xid, count in (row.get("xid_events") or {}).items():
        add("libremote_gpu_xid_events_total", [*labels, str(xid)], count)


class SnapshotCollector:
    """A prometheus_client collector over the telemetry's latest snapshot."""

    def __init__(self, telemetry: Published) -> None:
        self.telemetry = telemetry

    def collect(self) -> Iterator[Any]:
        telemetry = self.telemetry
        return families(telemetry.latest, health=telemetry.health.latest, ready=telemetry.latest_readiness())

    def describe(self) -> Iterator[Any]:
        return iter(())


def markdown() -> str:
    """docs/METRICS.md's table of every metric."""
    scopes = {"daemon": "always", "device": "per device", "residency": "per device, with --host-spill",
              "tenant": "per tenant", "session": "per open session", "gpu": "per GPU, where NVML is",
              "host": "always (a figure the host lacks is absent)", "thermal": "where the host has thermal zones"}
    lines = ["| name | type | labels | present | meaning |", "|---|---|---|---|---|"]
    for spec in METRICS:
        labels = ", ".join(f"`{label}`" for label in spec.labels) or "-"
        lines.append(f"| `{spec.name}` | {spec.type} | {labels} | {scopes[spec.scope]} | {spec.help} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown())
