"""Asks for 32 MiB against 8 MiB of device and 16 MiB of host: the first 20 MiB fit, the rest
raise out-of-memory; then frees and goes on.

Writes DIR/A.failed after the failure and waits for DIR/A.go (the neighbour works meanwhile).
Prints a JSON report: the figures after the five tensors that fit, where the error was raised
and its message, the figures after the failure and after freeing, and the values kept.

Environment: LIBREMOTE_SERVER (the daemon), DIR.
"""

import json
import os
import time
from pathlib import Path

import torch

import libremote

folder = Path(os.environ["DIR"])
MiB = 1 << 20
out = {}
four = 1024 * 1024                                   # float32 elements in 4 MiB
# 8 x 4 MiB = 32 MiB against 8 MiB of device and 16 MiB of host: the first five fit
# (one resident beside the neighbour's megabyte, four spilled), the rest cannot.
held = [torch.full((four,), float(i + 1), device="cuda") for i in range(5)]
torch.cuda.synchronize()
out["after_five"] = libremote.memory_stats()
extra = []
try:
    for i in range(5, 8):
        extra.append(torch.full((four,), float(i + 1), device="cuda"))
    out["alloc_line_raised"] = False                 # asynchronous, like CUDA
except Exception as exc:
    out["alloc_line_raised"] = repr(exc)
try:
    torch.cuda.synchronize()
    out["sync_raised"] = None
except torch.cuda.OutOfMemoryError as exc:
    out["sync_raised"] = type(exc).__name__
    out["is_torch_oom"] = isinstance(exc, torch.OutOfMemoryError)
    out["message"] = str(exc)
out["allocated_after_failure"] = torch.cuda.memory_allocated()
out["stats_after_failure"] = libremote.memory_stats()
(folder / "A.failed").write_text("1")
while not (folder / "A.go").exists():                # the neighbour works meanwhile
    time.sleep(0.02)

del extra
del held[:3]
torch.cuda.synchronize()
out["allocated_after_free"] = torch.cuda.memory_allocated()
fresh = torch.full((four,), 9.0, device="cuda")
fresh.add_(1.0)
out["sums"] = [t.sum().item() for t in (*held, fresh)]
out["values_ok"] = all(torch.equal(t.cpu(), torch.full((four,), v)) for t, v in zip((*held, fresh), (4.0, 5.0, 10.0)))
torch.cuda.synchronize()
out["final"] = libremote.memory_stats()
print(json.dumps(out), flush=True)
