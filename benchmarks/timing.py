"""How latency figures are taken: the best of several blocks, the same way for both sides.

On a small shared machine (the 2-core CI VM) one block of round trips moves by 2x from run to
run as the OS schedules the client, the daemon and ZeroMQ's I/O threads. Each figure is the mean
per call of the fastest of ``blocks`` blocks, and libremote and its raw reference are measured
the same way, so the ratio compares like with like.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def best_block_us(call: Callable[[], object], per_block: int = 400, blocks: int = 5, warmup: int = 100) -> float:
    """Mean microseconds per ``call()`` in the fastest of ``blocks`` blocks of ``per_block`` calls."""
    for _ in range(warmup):
        call()
    best = float("inf")
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(per_block):
            call()
        best = min(best, time.perf_counter() - start)
    return best / per_block * 1e6
