"""Starts, torch imported, and waits to be told to connect; then computes and reports.

Writes DIR/B.ready, waits for DIR/B.go, then connects (possibly waiting in the admission
queue) and prints {"total": ..., "session": ...}.

Environment: LIBREMOTE_SERVER (the daemon), DIR.
"""

import json
import os
import time
from pathlib import Path

import torch

import libremote

folder = Path(os.environ["DIR"])
(folder / "B.ready").touch()
while not (folder / "B.go").exists():
    time.sleep(0.02)
x = torch.full((1024,), 2.0, device="cuda")
print(json.dumps({"total": (x * 3).sum().item(), "session": libremote.server_info()["session"]}), flush=True)
