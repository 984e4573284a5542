"""This host's memory, as the CPU backend's device sees it (the front's status and the worker's
device facts both read it here)."""

from __future__ import annotations

import os


def host_memory_total() -> int:
    """Physical memory of this host, in bytes (0 where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def host_memory_info() -> tuple[int, int]:
    """(available, total) bytes of this host's memory: Linux's MemAvailable, else the total."""
    total = host_memory_total()
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, total
    except OSError:
        pass
    return total, total
