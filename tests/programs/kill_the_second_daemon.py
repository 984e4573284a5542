"""Computes on cuda:0 and cuda:1 (two daemons), then SIGKILLs the second daemon and its worker
and uses cuda:1 again, moves a tensor there, and uses cuda:0.

Prints {"before": whether a result on cuda:1 matched the same on cuda:0, "error": [the
exception's type, its message] using cuda:1 after the kill, "move_error": the error moving a
tensor there, "first_still_works", "is_connected": libremote.is_connected()}.

Environment: LIBREMOTE_SERVER (two daemons: tcp://a,tcp://b), SECOND_DAEMON_PID (the second
daemon's process id).
"""

import json
import os
import signal

import torch

import libremote
from libremote.client import runtime

out = {}
a = torch.randn(4, 4, device="cuda:0")
b = a.to("cuda:1")
out["before"] = (b @ b).sum().item() == (a @ a).sum().item()
second = runtime.session_for(1)
os.kill(int(os.environ["SECOND_DAEMON_PID"]), signal.SIGKILL)
os.kill(second.daemon_info["pid"], signal.SIGKILL)  # its worker
try:
    for _ in range(3):
        (b * 2).sum().item()
    out["error"] = None
except libremote.ConnectionFailed as exc:
    out["error"] = [type(exc).__name__, str(exc)]
try:
    a.to("cuda:1")
    out["move_error"] = None
except libremote.ConnectionFailed as exc:
    out["move_error"] = str(exc)
out["first_still_works"] = (a * 2).sum().item() == a.sum().item() * 2
out["is_connected"] = libremote.is_connected()
print(json.dumps(out))
