"""Limits the operating system enforces on a worker, beneath the code it runs.

The quota checks in a worker's code refuse what they can see coming; a kernel whose output is
sized by its data, a bookkeeping table grown by a hostile client, a bug: those the code does not
see. So each worker also runs under limits the kernel enforces, where the code being limited
cannot lift them:

- **memory**: in a cgroup v2 with ``memory.max`` when the daemon's cgroup is delegated to it
  (systemd's ``Delegate=yes``, a container's own cgroup), else ``RLIMIT_DATA`` (private writable
  mappings: the heap, anonymous ``mmap``, thread stacks; soft and hard limit set alike, so the
  worker cannot raise it). Past it, an allocation fails inside the worker: torch raises an
  out-of-memory error for that op (the session goes on), or the worker dies, alone;
- **CPU share**: ``nice`` from the tenant's priority class and weight (CFS gives a runnable process
  a share of CPU proportional to its nice weight, 1.25x per step): on the CPU backend the device
  *is* the CPU, so this is the tenants' fair share, enforced by the scheduler of the kernel. On a
  GPU it only orders the workers' host threads; the device time-slices between processes.

This module is torch-free: the front computes the limits, the zygote's child applies them.
"""

from __future__ import annotations

import logging
import math
import os
import resource
from pathlib import Path
from typing import Any

log = logging.getLogger("libremote.server")

#: nice of a worker of each priority class, at weight 1 (added to the front's own nice).
PRIORITY_NICE = {"high": 0, "normal": 5, "low": 15}
#: A weight moves a worker's nice by log_1.25(weight) steps, at most this many either way.
_MAX_WEIGHT_STEPS = 5
_CGROUP_ROOT = Path("/sys/fs/cgroup")


def nice_for(priority: str, weight: float) -> int:
    """The nice increment (over the front's) for a worker of this priority class and weight."""
    steps = round(math.log(max(weight, 1e-6)) / math.log(1.25))
    steps = max(-_MAX_WEIGHT_STEPS, min(_MAX_WEIGHT_STEPS, steps))
    return max(0, min(19, PRIORITY_NICE.get(priority, 5) - steps))


def data_bytes() -> int:
    """This process's private writable memory now (VmData, what RLIMIT_DATA counts)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmData:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def apply_in_child(limits: dict[str, Any]) -> None:
    """In a freshly forked worker: take the CPU share and the memory cap the front computed.

    ``limits``: ``nice`` (an increment), ``memory`` (bytes beyond what the process holds now, or
    None for no cap), ``cgroup`` (a delegated cgroup v2 folder to join, if any)."""
    increment = int(limits.get("nice") or 0)
    if increment:
        os.nice(increment)
    memory = limits.get("memory")
    cgroup = limits.get("cgroup")
    if cgroup:
        (Path(cgroup) / "cgroup.procs").write_text(str(os.getpid()))
    elif memory:
        cap = data_bytes() + int(memory)
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))


def adjust_memory(pid: int, delta: int) -> bool:
    """Move a running worker's RLIMIT_DATA by ``delta`` bytes (an admin changed its tenant's
    quota). Raising a hard limit needs CAP_SYS_RESOURCE; without it the new quota reaches the
    OS cap with the tenant's next worker, and this logs so."""
    try:
        soft, hard = resource.prlimit(pid, resource.RLIMIT_DATA)
        if hard == resource.RLIM_INFINITY:
            return True
        cap = max(0, hard + delta)
        resource.prlimit(pid, resource.RLIMIT_DATA, (cap, cap))
        return True
    except PermissionError:
        log.warning("could not move the memory cap of worker pid %d by %d bytes (needs CAP_SYS_RESOURCE); the new "
                    "quota is enforced by the worker's own checks, and by the OS from the tenant's next worker", pid, delta)
    except (ProcessLookupError, OSError, AttributeError):
        pass
    return False


def renice(pid: int, increment: int) -> bool:
    """Set every thread of process ``pid`` to the front's nice plus ``increment`` (a live weight
    or priority change). Raising a share back needs CAP_SYS_NICE; without it this logs why."""
    target = max(0, min(19, os.getpriority(os.PRIO_PROCESS, 0) + increment))
    try:
        threads = [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        threads = [pid]
    try:
        for tid in threads:
            os.setpriority(os.PRIO_PROCESS, tid, target)
        return True
    except PermissionError:
        log.warning("could not change the CPU share of worker pid %d to nice %d (raising a share needs "
                    "CAP_SYS_NICE); it takes effect for the tenant's next worker", pid, target)
    except ProcessLookupError:
        pass
    return False


class Cgroups:
    """Per-worker cgroups under the daemon's own, when cgroup v2 is delegated to it (else None
    from :meth:`detect`, and workers fall back to RLIMIT_DATA)."""

    def __init__(self, parent: Path) -> None:
        self.parent = parent

    @classmethod
    def detect(cls) -> Cgroups | None:
        try:
            if not (_CGROUP_ROOT / "cgroup.controllers").is_file():
                return None  # cgroup v1 or hybrid: no unified memory controller to delegate
            own = Path("/proc/self/cgroup").read_text().strip().splitlines()
            relative = next(line.split("::", 1)[1] for line in own if line.startswith("0::"))
            parent = _CGROUP_ROOT / relative.lstrip("/")
            if "memory" not in (parent / "cgroup.controllers").read_text().split():
                return None
            if "memory" not in (parent / "cgroup.subtree_control").read_text().split():
                # Controllers reach child cgroups only from a cgroup with no processes of its own
                # ("no internal processes"): the front moves itself into a leaf first.
                leaf = parent / "libremote-front"
                leaf.mkdir(exist_ok=True)
                (leaf / "cgroup.procs").write_text(str(os.getpid()))
                (parent / "cgroup.subtree_control").write_text("+memory")
            return cls(parent)
        except (OSError, StopIteration):
            return None

    def create(self, name: str, memory_max: int) -> str | None:
        """A cgroup for one worker, capped at ``memory_max`` bytes (its folder), or None."""
        try:
            folder = self.parent / f"libremote-{name}"
            folder.mkdir(exist_ok=True)
            (folder / "memory.max").write_text(str(memory_max))
            (folder / "memory.swap.max").write_text("0") if (folder / "memory.swap.max").exists() else None
            return str(folder)
        except OSError as exc:
            log.warning("could not make a cgroup for worker %s (%s): using RLIMIT_DATA", name, exc)
            return None

    def remove(self, folder: str) -> None:
        try:
            Path(folder).rmdir()
        except OSError:
            pass
