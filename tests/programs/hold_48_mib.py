"""Holds 48 MiB, announces itself with DIR/NAME.in and waits for DIR/go; prints its sum and
torch.cuda.memory_allocated().

Environment: LIBREMOTE_SERVER (the daemon), DIR, NAME.
"""

import json
import os
import time
from pathlib import Path

import torch

folder, name = Path(os.environ["DIR"]), os.environ["NAME"]
a = torch.ones(48 << 20, dtype=torch.uint8, device="cuda")
torch.cuda.synchronize()
(folder / (name + ".in")).write_text("1")
while not (folder / "go").exists():
    time.sleep(0.02)
allocated = torch.cuda.memory_allocated()
print(json.dumps({"sum": a.sum().item(), "allocated": allocated}), flush=True)
