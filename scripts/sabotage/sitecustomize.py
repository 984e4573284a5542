"""Switch off one enforcement point of the daemon (scripts/enforcement_check.py; never in use).

Python imports this module at start-up when its folder is on PYTHONPATH. If LIBREMOTE_SABOTAGE
names a point, the function that enforces it is replaced as soon as its module is imported, in
every interpreter the tests start (front, zygote and its forked workers, clients, pytest)."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Callable
from typing import Any


def _set(module: Any, path: str, value: Any) -> None:
    owner = module
    *parents, name = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    setattr(owner, name, value)


def _fifo(waiter: Any) -> tuple[int, float]:
    return (0, waiter.since)


def _one_worker(original: Callable[..., Any]) -> Callable[..., Any]:
    def worker_for(self: Any, key: str, tenant: Any, priority: str) -> Any:
        return original(self, "everyone", tenant, priority)

    return worker_for


def _charge_ignoring_weight(self: Any, session: Any, seconds: float) -> None:
    session.virtual_time += seconds


_EQUAL = {"low": 1, "normal": 1, "high": 1}

#: point -> module -> [(attribute path, replacement: a value, or a function of the original)]
PATCHES: dict[str, dict[str, list[tuple[str, Any]]]] = {
    "quota_before": {"libremote_server.worker.session": [("Session._check_quota_before", lambda *a, **k: None)]},
    "quota_after": {"libremote_server.worker.session": [("Session._over_quota", lambda self, extra=0: False)]},
    "zeroing": {"libremote_server.worker.zeroing": [("zero_fresh_results", lambda *a, **k: None),
                                                    ("zero_beyond_results", lambda *a, **k: None)]},
    "tenant_weights": {"libremote_server.os_limits": [("nice_for", lambda priority, weight: 0)]},
    "session_weights": {"libremote_server.worker.scheduler": [("Scheduler.charge", _charge_ignoring_weight)]},
    "priorities": {"libremote_server.admission": [("queue_order", _fifo)],
                   "libremote_server.broker": [("PRIORITIES", _EQUAL)],
                   "libremote_server.worker.residency": [("PRIORITIES", _EQUAL)],
                   "libremote_server.worker.scheduler": [("PRIORITIES", _EQUAL)]},
    "reclaim": {"libremote_server.peers": [("Peers.closed", lambda self: [])]},
    "curve_binding": {"libremote_server.auth": [("same_owner", lambda bound, user: True),
                                                ("KeyRing.only_tenant", lambda self, name: self)]},
    "op_rules": {"libremote_server.worker.op_policy": [("_rules_enforced", False),
                                                      ("enforce_rules", ("wrap", lambda original: lambda on: original(False)))]},
    "process_per_tenant": {"libremote_server.workers": [("WorkerPool.worker_for", ("wrap", _one_worker))]},
}


class _Patcher(importlib.abc.MetaPathFinder):
    def __init__(self, patches: dict[str, list[tuple[str, Any]]]) -> None:
        self.patches = patches

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name not in self.patches:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        loader, patches = spec.loader, self.patches[name]
        original_exec = loader.exec_module

        def exec_module(module: Any) -> None:
            original_exec(module)
            for attribute, replacement in patches:
                if isinstance(replacement, tuple) and replacement[0] == "wrap":
                    owner = module
                    for part in attribute.split(".")[:-1]:
                        owner = getattr(owner, part)
                    replacement = replacement[1](getattr(owner, attribute.split(".")[-1]))
                _set(module, attribute, replacement)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


_point = os.environ.get("LIBREMOTE_SABOTAGE")
if _point in PATCHES:
    sys.meta_path.insert(0, _Patcher(PATCHES[_point]))
