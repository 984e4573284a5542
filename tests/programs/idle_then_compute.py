"""Computes, then stays connected but idle until told to go, then computes again.

Writes DIR/idle.in once its first result is in, waits (heartbeating, sending no work) for
DIR/idle.go, then prints {"type": None} if its next sync point worked, else the exception's
type, whether it is a libremote error, and its message.

Environment: LIBREMOTE_SERVER (the daemon), DIR.
"""

import json
import os
import time
from pathlib import Path

import torch

import libremote

folder = Path(os.environ["DIR"])
x = torch.arange(10.0).cuda()
assert x.sum().item() == 45.0
open(folder / "idle.in", "w").close()
while not os.path.exists(folder / "idle.go"):  # alive (heartbeats) but idle
    time.sleep(0.05)
try:
    (x + 1).sum().item()
    out = {"type": None}
except Exception as exc:
    out = {"type": type(exc).__name__, "is_libremote": isinstance(exc, libremote.LibremoteError),
           "message": str(exc)}
print(json.dumps(out), flush=True)
