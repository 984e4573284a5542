"""Multiplies 768x768 matrices on the daemon for SECONDS seconds, a sync point after each product,
and prints how many it finished: {"done": N} (device-bound: the client's own cost per product is
tiny).

Announces itself with DIR/NAME.in and starts when DIR/go exists, so that every client starts
together.

Environment: LIBREMOTE_SERVER (the daemon), DIR, NAME, SECONDS, LIBREMOTE_TENANT,
LIBREMOTE_TOKEN.
"""

import json
import os
import time
from pathlib import Path

import torch

folder, name, seconds = Path(os.environ["DIR"]), os.environ["NAME"], float(os.environ["SECONDS"])
a = torch.randn(768, 768, device="cuda")
a.sum().item()
(folder / (name + ".in")).touch()
while not (folder / "go").exists():
    time.sleep(0.01)
done, deadline = 0, time.monotonic() + seconds
while time.monotonic() < deadline:
    (a @ a).sum().item()
    done += 1
print(json.dumps({"done": done}), flush=True)
