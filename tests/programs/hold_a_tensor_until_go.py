"""Holds a tensor, waits for DIR/go, and reports what its next use gives.

Announces itself with DIR/NAME.in (holding its worker's pid, which the test may kill). Prints
{"sum": ...} if the next use worked, else {"error": the exception's type, "message"}.

Environment: LIBREMOTE_SERVER (the daemon), DIR, NAME, LIBREMOTE_TENANT, LIBREMOTE_TOKEN.
"""

import json
import os
import time
from pathlib import Path

import torch

import libremote

folder = Path(os.environ["DIR"]); name = os.environ["NAME"]
x = torch.arange(4.0, device="cuda")
assert x.sum().item() == 6.0
(folder / (name + ".in")).write_text(str(libremote.server_info()["pid"]))
while not (folder / "go").exists():
    time.sleep(0.05)
try:
    print(json.dumps({"sum": (x * 2).sum().item()}), flush=True)
except Exception as exc:
    print(json.dumps({"error": type(exc).__name__, "message": str(exc)}), flush=True)
