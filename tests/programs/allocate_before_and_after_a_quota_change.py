"""Allocates 32 MiB before and after the test changes its session's quota.

The first allocation's error (or None) is reported; the client then writes DIR/resize.in (its
session id), waits for DIR/resize.go, allocates 32 MiB again, and prints a JSON report
(first, allocated, second_sum, session_before, session_after).

Environment: LIBREMOTE_SERVER (the daemon), DIR.
"""

import json
import os
import time
from pathlib import Path

import torch

import libremote

folder = Path(os.environ["DIR"])
out = {"session_before": libremote.connect()["session"]}
a = torch.empty(32 << 20, dtype=torch.uint8, device="cuda")
try:
    torch.cuda.synchronize()
    out["first"] = None
except torch.cuda.OutOfMemoryError as exc:
    out["first"] = str(exc)
del a
(folder / "resize.in").write_text(out["session_before"])
while not (folder / "resize.go").exists():
    time.sleep(0.02)
b = torch.empty(32 << 20, dtype=torch.uint8, device="cuda")
b.fill_(1)
out["allocated"] = torch.cuda.memory_allocated()
out["second_sum"] = b.sum().item()
out["session_after"] = libremote.server_info()["session"]
print(json.dumps(out), flush=True)
