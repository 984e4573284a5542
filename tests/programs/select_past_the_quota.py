"""A boolean selection whose size comes from the data: 40 MiB more beside 50 MiB held.

Prints {"raised": the out-of-memory message or None, "allocated", "small"} ("small": a small
selection afterwards, to show the session goes on).

Environment: LIBREMOTE_SERVER (the daemon).
"""

import json

import torch

x = torch.ones(10 << 20, device="cuda")          # 40 MiB
mask = x > 0                                      # 10 MiB
out = {}
try:
    selected = x[mask]                            # 40 MiB more: its size comes from the data
    torch.cuda.synchronize()
    out["raised"] = None
except torch.cuda.OutOfMemoryError as exc:
    out["raised"] = str(exc)
out["allocated"] = torch.cuda.memory_allocated()
del mask
out["small"] = x[:4][x[:4] > 0].sum().item()     # the session goes on
print(json.dumps(out))
