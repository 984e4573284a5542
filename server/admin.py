"""Live changes by an operator (``libremote admin``): quotas, weights and priorities of a session
or of a tenant's sessions, present and future.

A change reaches the front's registry, the worker that runs each session (an UPDATE), and the
limits the kernel enforces on that worker: its memory cap when the tenant's quota moves, its CPU
share when the weight or priority does (os_limits.py).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from libremote_wire.messages import Ctl

from . import os_limits, policy
from .admission import FrontSession
from .policy import PolicyError
from .telemetry.collect import Telemetry
from .workers import WorkerPool


class Pool(Protocol):
    """What a live change reaches: the policy, the session registry and the workers (front.py's
    ``Front`` is one)."""

    pool: policy.PoolConfig
    sessions: dict[bytes, FrontSession]
    workers: WorkerPool
    draining: str | None
    telemetry: Telemetry | None

log = logging.getLogger("libremote.server")


def apply(front: Pool, request: dict[str, Any]) -> dict[str, Any]:
    """Carry out an ADMIN request (from an admin: auth.py decided); its answer."""
    changes = {key: request[key] for key in ("memory_quota", "weight", "priority") if request.get(key) is not None}
    if request.get("drain") is not None and not changes and not request.get("session") and not request.get("tenant"):
        return drain(front, bool(request["drain"]))
    if not changes:
        raise PolicyError("nothing to change: give memory_quota, weight and/or priority (or drain)")
    quota = policy.parse_size(changes["memory_quota"]) if "memory_quota" in changes else None
    weight = policy.parse_weight(changes["weight"]) if "weight" in changes else None
    priority = policy.parse_priority(changes["priority"]) if "priority" in changes else None
    session_id, tenant_name = request.get("session"), request.get("tenant")
    if bool(session_id) == bool(tenant_name):
        raise PolicyError("name exactly one target: a session id or a tenant")
    previous_tenant_quota: int | None = None
    if tenant_name:
        tenant = front.pool.tenant_named(tenant_name)
        if tenant is not None:  # future sessions of the tenant too
            previous_tenant_quota = tenant.memory_quota
            tenant.memory_quota = quota or tenant.memory_quota
            tenant.weight = weight or tenant.weight
            tenant.priority = priority or tenant.priority
        targets = [s for s in front.sessions.values() if s.tenant.name == tenant_name]
        if tenant is None and not targets:
            raise PolicyError(f"no tenant or session of tenant {tenant_name!r}")
    else:
        targets = [s for s in front.sessions.values() if s.id == session_id]
        if not targets:
            raise PolicyError(f"no session {session_id!r} (see libremote status)")
    reniced, capped = set(), set()
    for session in targets:
        worker = session.worker
        # The tenant's shared quota moves with a change to the tenant, or to a session that has
        # its worker to itself (no identities: each session is its own tenant).
        alone = worker.key != session.tenant.name
        tenant_quota = quota if quota is not None and (tenant_name or alone) else None
        if (tenant_quota is not None and worker.pid is not None and worker.id not in capped
                and worker_memory_follows(front, session)):
            capped.add(worker.id)  # the OS cap of its process follows (os_limits.py)
            before = session.memory_quota if alone or previous_tenant_quota is None else previous_tenant_quota
            os_limits.adjust_memory(worker.pid, tenant_quota - before)
        session.memory_quota = quota if quota is not None else session.memory_quota
        session.weight = weight if weight is not None else session.weight
        session.priority = priority if priority is not None else session.priority
        front.workers.send(worker, [Ctl.UPDATE, session.id, {
            "memory_quota": quota, "weight": weight, "priority": priority, "tenant_quota": tenant_quota}])
        if ((weight is not None or priority is not None) and (tenant_name or alone) and worker.pid
                and worker.id not in reniced):
            # The CPU share of the tenant's process follows (os_limits.py). (A session's own weight
            # within its tenant is its worker's scheduler's business: the UPDATE above.)
            reniced.add(worker.id)
            os_limits.renice(worker.pid, os_limits.nice_for(priority or session.priority, weight or session.weight))
    if front.telemetry is not None:
        front.telemetry.counters.quota_changes += 1
    log.info("admin: %s %s -> %s", "tenant" if tenant_name else "session", tenant_name or session_id, changes,
             extra={"event": "quota_change", "tenant": tenant_name or (targets[0].tenant.name if targets else None),
                    "session": session_id or None, "changes": changes, "sessions": [s.id for s in targets]})
    return {"ok": True, "message": f"updated {len(targets)} session(s)", "sessions": [s.id for s in targets]}


def drain(front: Pool, on: bool) -> dict[str, Any]:
    """Stop (or resume) taking new sessions: clients are refused with the reason, the sessions
    running go on, and readiness (``/readyz``) turns false, so a load balancer or Kubernetes
    sends new clients elsewhere (docs/DEPLOYMENT.md)."""
    front.draining = "an operator asked (libremote admin --drain)" if on else None
    if front.telemetry is not None:
        front.telemetry.ready_state = front.telemetry.readiness()  # (/readyz says it at once)
    log.warning("admin: the daemon is %s", "draining: no new sessions" if on else "taking new sessions again",
                extra={"event": "drain", "draining": on, "sessions": len(front.sessions)})
    state = "draining: it takes no new sessions" if on else "taking new sessions"
    return {"ok": True, "message": f"the daemon is {state} ({len(front.sessions)} session(s) open)", "sessions": []}


def worker_memory_follows(front: Pool, session: FrontSession) -> bool:
    """Whether a quota change moves the OS cap of the session's worker (CPU backend: device
    memory is host memory there; the cap is the tenant's quota plus a margin)."""
    return front.workers.device_type == "cpu" and front.workers.memory_margin > 0 and session.worker.pid is not None
