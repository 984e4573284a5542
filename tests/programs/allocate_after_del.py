"""Holds 48 MiB, deletes it, and allocates 32 MiB with no sync point in between.

Prints {"raised": None, "allocated": ...}, or {"raised": message} when the allocation failed.

Environment: LIBREMOTE_SERVER (the daemon).
"""

import json

import torch

a = torch.empty(48 << 20, dtype=torch.uint8, device="cuda")
torch.cuda.synchronize()
del a
c = torch.empty(32 << 20, dtype=torch.uint8, device="cuda")
try:
    torch.cuda.synchronize()
    print(json.dumps({"raised": None, "allocated": torch.cuda.memory_allocated()}))
except torch.cuda.OutOfMemoryError as exc:
    print(json.dumps({"raised": str(exc)}))
