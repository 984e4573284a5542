"""Disable each enforcement point of the daemon in turn and show which tests catch it.

A test suite that stays green with an enforcement point switched off does not protect it. This
script switches one point off at a time (in every process the tests start: the daemon's front,
its zygote and workers, and the test process itself) and runs the tests meant to guard it; each
point must make at least one of them fail. Run it before each release (it takes a while):

    python scripts/enforcement_check.py                 # every point
    python scripts/enforcement_check.py quota_before    # one

How: ``scripts/sabotage/sitecustomize.py`` is put first on PYTHONPATH with LIBREMOTE_SABOTAGE
naming the point; Python runs it at start-up in every interpreter, and it replaces one function
of the daemon as its module is imported. Nothing in the daemon's own code knows about it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SABOTAGE = REPO / "scripts" / "sabotage"

#: point -> the tests that must catch it (pytest node ids or -k expressions per file).
POINTS: dict[str, list[str]] = {
    "quota_before": ["tests/test_memory_isolation.py"],
    "quota_after": ["tests/test_pool.py::test_an_output_sized_by_its_data_is_checked_against_the_quota_after_it_runs"],
    "zeroing": ["tests/test_memory_isolation.py"],
    "tenant_weights": ["tests/test_tenant_isolation.py::test_tenants_share_the_cpu_backend_by_their_weights"],
    "session_weights": ["tests/test_pool.py::test_sessions_of_a_tenant_share_its_worker_by_their_weights"],
    "priorities": ["tests/test_pool.py::test_admission_queue_admits_high_priority_first",
                   "tests/test_oversubscription.py::test_low_priority_sessions_are_spilled_before_high_priority_ones"],
    "reclaim": ["tests/test_faults.py::test_killed_client_session_and_memory_are_reclaimed"],
    "curve_binding": ["tests/test_auth.py"],
    "op_rules": ["tests/test_op_allowlist.py", "tests/test_op_rules.py"],
    "process_per_tenant": ["tests/test_tenant_isolation.py"],
}


def run(point: str) -> tuple[bool, str]:
    env = dict(os.environ, LIBREMOTE_SABOTAGE=point,
               PYTHONPATH=os.pathsep.join([str(SABOTAGE), str(REPO), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-n", "2", "-p", "no:cacheprovider", *POINTS[point]]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    summary = (result.stdout.strip().splitlines() or [""])[-1]
    return result.returncode != 0, summary


def main(argv: list[str]) -> int:
    chosen = argv or list(POINTS)
    unknown = [point for point in chosen if point not in POINTS]
    if unknown:
        print(f"unknown points {unknown}; known: {', '.join(POINTS)}", file=sys.stderr)
        return 2
    missed = []
    for point in chosen:
        started = time.monotonic()
        caught, summary = run(point)
        print(f"{point:20} {'caught' if caught else 'MISSED'}  ({time.monotonic() - started:.0f} s)  {summary}", flush=True)
        if not caught:
            missed.append(point)
    if missed:
        print(f"\nno test failed with these points switched off: {', '.join(missed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
