"""Computes on cuda:0 and cuda:1, then SIGKILLs the daemon of cuda:1 (and its worker) and uses
cuda:1 again, then cuda:0.

Prints {"before": whether a result on cuda:1 matched local torch, "second": the daemon of
cuda:1, "error": the ConnectionFailed message using cuda:1 after the kill (null if none),
"first_still_works"}.

Environment: LIBREMOTE_SERVER (a pool), LIBREMOTE_DEVICES=2, PIDS (JSON: each daemon's address
to its process id).
"""

import json
import os
import signal

import torch

import libremote
from libremote.client import runtime

pids = json.loads(os.environ["PIDS"])
out = {}
a = torch.randn(4, 4, device="cuda:0")
b = a.to("cuda:1")
out["before"] = torch.equal((b @ b).cpu(), a.cpu() @ a.cpu())
second = runtime.session_for(1)
out["second"] = second.address
os.kill(pids[second.address], signal.SIGKILL)
os.kill(second.daemon_info["pid"], signal.SIGKILL)  # its worker
try:
    for _ in range(3):
        (b * 2).sum().item()
    out["error"] = None
except libremote.ConnectionFailed as exc:
    out["error"] = str(exc)
out["first_still_works"] = (a * 2).sum().item() == a.sum().item() * 2
print(json.dumps(out))
