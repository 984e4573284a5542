"""Grows an empty tensor in place past a 64 MiB quota, then reports what was raised.

GROWTH chooses how: "out_argument" writes 80 MiB into a 0-byte ``out=`` tensor, "resize"
resizes it to 80 MiB with ``resize_``. Prints {"raised": the out-of-memory message or None,
"allocated": torch.cuda.memory_allocated()}.

Environment: LIBREMOTE_SERVER (the daemon), GROWTH.
"""

import json
import os

import torch

growth = os.environ["GROWTH"]
if growth == "out_argument":
    x = torch.empty(0, device='cuda'); torch.ones(20 << 20, out=x)  # 80 MiB written into a 0-byte out=
elif growth == "resize":
    x = torch.empty(0, device='cuda'); x.resize_(20 << 20)  # 80 MiB: resized past the 64 MiB quota
else:
    raise SystemExit(f"unknown GROWTH {growth!r}")
try:
    torch.cuda.synchronize()
    out = {"raised": None}
except torch.cuda.OutOfMemoryError as exc:
    out = {"raised": str(exc)}
out["allocated"] = torch.cuda.memory_allocated()
print(json.dumps(out))
