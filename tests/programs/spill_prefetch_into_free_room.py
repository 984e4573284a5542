"""Has a tensor spilled, frees room for it, then queues 200 small ops and a read of it.

Prints {"total", "spilled_a", "prefetches", "restores", "bytes_prefetched"} (the last three:
counted over the queued ops and the read).

Environment: LIBREMOTE_SERVER (the daemon), LIBREMOTE_BATCH (large: one message).
"""

import json

import torch

import libremote

MiB = 1 << 20
a = torch.full((MiB,), 5.0, device="cuda")   # 4 MiB each; the budget holds three
b = torch.full((MiB,), 6.0, device="cuda")
c = torch.full((MiB,), 7.0, device="cuda")
d = torch.full((MiB,), 8.0, device="cuda")   # spills a, the least recently used
torch.cuda.synchronize()
before = libremote.memory_stats()["device"]
del d                                        # room for a again
s = torch.zeros(4, device="cuda")
for _ in range(200):                         # several slices of small ops, all in one
                                             # message with the read of a (LIBREMOTE_BATCH)
    s = s + 1
total = (a.sum() + s.sum()).item()           # ... then one that reads a
after = libremote.memory_stats()["device"]
print(json.dumps({"total": total, "spilled_a": before["spilled_bytes"],
                  **{k: after[k] - before[k] for k in ("prefetches", "restores", "bytes_prefetched")}}))
