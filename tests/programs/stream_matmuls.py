"""Streams matmuls for SECONDS seconds, 16 queued before each sync, and reports how many it did.

Announces itself with DIR/NAME.in (its session id), waits for DIR/go so that every client
starts together, then prints {"done": N}.

Environment: LIBREMOTE_SERVER (the daemon), DIR, NAME, SECONDS.
"""

import json
import os
import time
from pathlib import Path

import torch

import libremote

folder, name = Path(os.environ["DIR"]), os.environ["NAME"]
a = torch.randn(384, 384, device="cuda")
a.sum().item()
(folder / (name + ".tmp")).write_text(libremote.server_info()["session"])
os.replace(folder / (name + ".tmp"), folder / (name + ".in"))
while not (folder / "go").exists():
    time.sleep(0.01)
done, deadline = 0, time.monotonic() + float(os.environ["SECONDS"])
while time.monotonic() < deadline:
    for _ in range(16):          # a backlog of queued ops: the worker's scheduler chooses
        c = a @ a
    c.sum().item()
    done += 16
print(json.dumps({"done": done}), flush=True)
