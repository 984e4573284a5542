"""A client that holds a tensor until told to go: the pool tests' stand-in for a session in use.

Connects (possibly after waiting in the admission queue), announces itself with DIR/NAME.in
(holding its session id), holds a tensor until DIR/NAME.go exists, checks the tensor, prints a
JSON report (admitted, session, total, priority, tenant) and exits, saying goodbye. A client the
daemon refuses prints {"admitted": false, "message": ...} and exits 0.

Environment: LIBREMOTE_SERVER (the daemon), NAME, DIR.
"""

import json
import os
import time
from pathlib import Path

import torch

import libremote

name, folder = os.environ["NAME"], Path(os.environ["DIR"])
try:
    x = torch.full((1024,), 2.0, device="cuda")
    assert x.sum().item() == 2048.0
except libremote.ConnectionFailed as exc:
    print(json.dumps({"name": name, "admitted": False, "message": str(exc)}), flush=True)
    raise SystemExit(0) from None
info = libremote.server_info()
(folder / (name + ".tmp")).write_text(info["session"])
os.replace(folder / (name + ".tmp"), folder / (name + ".in"))
while not (folder / (name + ".go")).exists():
    time.sleep(0.05)
total = (x * 3).sum().item()
print(json.dumps({"name": name, "admitted": True, "session": info["session"], "total": total,
                  "priority": info.get("priority"), "tenant": info.get("tenant")}), flush=True)
