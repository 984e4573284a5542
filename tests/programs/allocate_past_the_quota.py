"""Holds 48 MiB and asks for 32 MiB more; reports where the out-of-memory error was raised.

Prints {"raised": the message or None, "allocated": ...}. Run with LIBREMOTE_SYNC=1, the error
is raised on the allocation's own line.

Environment: LIBREMOTE_SERVER (the daemon), LIBREMOTE_SYNC.
"""

import json

import torch

out = {}
a = torch.empty(48 << 20, dtype=torch.uint8, device="cuda")
try:
    b = torch.empty(32 << 20, dtype=torch.uint8, device="cuda")
    out["raised"] = None
except torch.cuda.OutOfMemoryError as exc:
    out["raised"] = str(exc)
out["allocated"] = torch.cuda.memory_allocated()
print(json.dumps(out), flush=True)
