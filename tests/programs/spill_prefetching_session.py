"""Has its 4 MiB tensor spilled, then queues 200 small ops and a read of it: the daemon prefetches
it ahead of the read.

Writes DIR/A.in once the tensor is spilled and waits for DIR/A.go. Prints {"total",
"spilled_a", "prefetches", "restores"}.

Environment: LIBREMOTE_SERVER (the daemon), DIR, LIBREMOTE_BATCH (large: one message).
"""

import json
import os
import time
from pathlib import Path

import torch

import libremote

folder, MiB = Path(os.environ["DIR"]), 1 << 20
a = torch.full((MiB,), 5.0, device="cuda")            # 4 MiB each; the budget holds three
spare = [torch.zeros(MiB, device="cuda") for _ in range(3)]   # the third spills a
del spare
torch.cuda.synchronize()
(folder / "A.in").touch()
while not (folder / "A.go").exists():
    time.sleep(0.05)
before = libremote.memory_stats()["device"]
s = torch.zeros(4, device="cuda")
for _ in range(200):
    s = s + 1
total = (a.sum() + s.sum()).item()
after = libremote.memory_stats()["device"]
print(json.dumps({"total": total, "spilled_a": before["spilled_bytes"],
                  **{k: after[k] - before[k] for k in ("prefetches", "restores")}}), flush=True)
