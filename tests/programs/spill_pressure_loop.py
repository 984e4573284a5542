"""Makes a new 4 MiB tensor every round and checks a sum with it, forcing evictions of the other
sessions' storages, until DIR/stop exists (or 5000 rounds).

Writes DIR/pressure.in when ready and starts at DIR/go. Prints {"bad": wrong sums, "rounds"}.

Environment: LIBREMOTE_SERVER (the daemon), DIR.
"""

import json
import os
import time
from pathlib import Path

import torch

folder = Path(os.environ["DIR"])
a = torch.ones(1024 * 1024, device="cuda")           # 4 MiB
torch.cuda.synchronize()
(folder / "pressure.in").touch()
while not (folder / "go").exists():
    time.sleep(0.02)
bad, i = 0, 0
while not (folder / "stop").exists() and i < 5000:
    b = torch.full((1024 * 1024,), float(i % 5), device="cuda")   # 4 + 4 + 4 MiB: evicts x
    if (a + b).sum().item() != (1 + i % 5) * 1024 * 1024:
        bad += 1
    i += 1
print(json.dumps({"bad": bad, "rounds": i}), flush=True)
