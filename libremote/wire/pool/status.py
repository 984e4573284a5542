"""``libremote status --pool etcd://...``: every daemon and device of the pool, the pool-wide
queue, and each tenant's usage against its quota, read from etcd in one revision."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from .etcd import Etcd
from .placement import Load
from .view import read, with_figures


def report(etcd: Etcd) -> dict[str, Any]:
    """The pool as JSON-ready data (what ``--json`` prints)."""
    prefix = etcd.address.prefix
    view = with_figures(etcd, etcd.address.pool, read(etcd, prefix))
    load = view.load()
    now = time.time()
    daemons = []
    for daemon in sorted(view.daemons, key=lambda d: d.id):
        row = asdict(daemon)
        row["age_s"] = round(now - daemon.updated, 1)
        for device in row["devices"]:
            held = load.get((daemon.id, device["index"]), Load())
            device["reserved_memory"], device["placed"] = held.memory, held.sessions
        daemons.append(row)
    tenants: dict[str, dict[str, Any]] = {}
    for name in sorted({r.tenant for r in view.reservations} | set(view.quotas)):
        usage = view.tenant_usage(name)
        quota = view.quotas.get(name)
        tenants[name] = {"memory": usage.memory, "devices": usage.sessions,
                         "quota_memory": quota.memory if quota else None,
                         "quota_devices": quota.devices if quota else None}
    queue = [{"tenant": w.tenant, "priority": w.priority, "devices": w.devices, "memory": w.memory, "model": w.model,
              "node": w.node, "host": w.host, "pid": w.pid, "waited_s": round(now - w.since, 1)}
             for w in view.ordered_waiters()]
    return {"pool": str(etcd.address), "revision": view.revision, "daemons": daemons, "queue": queue,
            "tenants": tenants}


def format_report(data: dict[str, Any]) -> str:
    lines = [(f"pool {data['pool']}: {len(data['daemons'])} daemons, "
             f"{sum(len(d['devices']) for d in data['daemons'])} devices, {len(data['queue'])} waiting")]
    lines.append(f"  {'DAEMON':<24} {'NODE':<12} {'DEV':>3} {'MODEL':<24} {'MEMORY RESERVED/TOTAL':>22} "
                 f"{'SESS':>4} {'LOAD':>5} {'STATE':<10} SHARING")
    for daemon in data["daemons"]:
        for device in daemon["devices"]:
            memory = f"{_gib(device['reserved_memory'])}/{_gib(device['memory_total'])}"
            state = device["state"] if daemon["state"] == "ready" else daemon["state"]
            lines.append(f"  {daemon['id']:<24} {daemon['node']:<12} {device['index']:>3} {device['model'][:24]:<24} "
                         f"{memory:>22} {device['sessions']:>4} {device['load']:>5.0%} {state:<10} {device['sharing']}")
    if data["queue"]:
        lines.append("  queue (in order):")
        for position, waiter in enumerate(data["queue"], start=1):
            memory = _gib(waiter["memory"]) if waiter["memory"] else "default"
            pins = "".join(f", {key} {waiter[key]}" for key in ("model", "node") if waiter[key])
            lines.append(f"    {position}. tenant {waiter['tenant']} ({waiter['priority']}): {waiter['devices']} x {memory}"
                         f"{pins}, pid {waiter['pid']} on {waiter['host']}, waiting {waiter['waited_s']:g} s")
    if data["tenants"]:
        lines.append("  tenants (across the pool):")
        for name, row in data["tenants"].items():
            memory_cap = _gib(row["quota_memory"]) if row["quota_memory"] is not None else "no cap"
            device_cap = row["quota_devices"] if row["quota_devices"] is not None else "no cap"
            lines.append(f"    {name}: memory {_gib(row['memory'])} of {memory_cap}, devices {row['devices']} of {device_cap}")
    return "\n".join(lines)


def _gib(value: int) -> str:
    return f"{value / (1 << 30):.1f}GiB"
