"""The daemon process's own host memory: keep freed buffers for reuse while busy, give them back
to the operating system when idle.

Tensor bytes cross the daemon's host memory on every upload (ZeroMQ's receive buffer, then the
tensor on the CPU backend or the staging copy on a GPU server) and on every download. Those buffers
are large, and glibc's malloc serves anything above 32 MiB with a fresh ``mmap`` and returns it
with ``munmap`` on free, so every 64 MiB upload paid first-touch page faults on two fresh buffers:
on the 2-core VM it ran at ~1.2 GB/s, and at ~1.6-1.8 GB/s with freed memory kept for reuse
(benchmarks/README.md). So, like torch's CUDA caching allocator for device memory, the daemon
keeps freed host memory in malloc's heap while it works, and trims it back once it is idle.

glibc only (``mallopt``/``malloc_trim``); elsewhere both functions do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("libremote.server")

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018  (both must exist: glibc)
        return libc
    except (OSError, AttributeError):
        return None


_libc = _glibc()


def keep_freed_memory() -> bool:
    """Serve large allocations from malloc's heap (no ``mmap``) and keep what is freed there
    (the heap is trimmed only above 2 GiB of free top, or by :func:`give_back_freed_memory`).
    Returns whether this took effect."""
    if _libc is None:
        return False
    ok: bool = _libc.mallopt(_M_MMAP_MAX, 0) == 1 and _libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1
    if not ok:
        log.warning("could not tune malloc (mallopt failed): large host buffers stay unpooled")
    return ok


def give_back_freed_memory() -> None:
    """Return the free memory kept in malloc's heap to the operating system."""
    if _libc is not None:
        _libc.malloc_trim(0)
