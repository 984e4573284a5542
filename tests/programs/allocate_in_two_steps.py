"""Allocates in two steps and reports its figures at each (the status tests' client).

Step "one": 8 MiB; step "two": 4 MiB more. At each step it writes DIR/STEP.in (JSON:
torch.cuda.memory_allocated() and its session id) and waits for DIR/STEP.go; then prints
{"sum": ...} and exits.

Environment: LIBREMOTE_SERVER (the daemon), DIR.
"""

import json
import os
import time
from pathlib import Path

import torch

import libremote

folder = Path(os.environ["DIR"])
def step(name):
    torch.cuda.synchronize()
    (folder / (name + ".tmp")).write_text(json.dumps({"allocated": torch.cuda.memory_allocated(),
                                                      "session": libremote.server_info()["session"]}))
    os.replace(folder / (name + ".tmp"), folder / (name + ".in"))
    while not (folder / (name + ".go")).exists():
        time.sleep(0.02)
x = torch.ones(2 << 20, device="cuda")  # 8 MiB of float32
step("one")
y = torch.ones(1 << 20, device="cuda")  # 4 MiB more
step("two")
print(json.dumps({"sum": (x.sum() + y.sum()).item()}), flush=True)
