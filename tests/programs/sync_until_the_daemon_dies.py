"""Writes the file READY, then waits on a sync point after every matmul until one fails (the test
kills the daemon meanwhile).

Prints the exception's type and message.

Environment: LIBREMOTE_SERVER (the daemon), LIBREMOTE_HEARTBEAT, READY.
"""

import json
import os

import torch

import libremote

x = torch.randn(256, 256).cuda()
assert x.sum().item() == x.sum().item()
open(os.environ["READY"], "w").close()
out = {}
try:
    for _ in range(100000):
        x = (x @ x).tanh()
        x.sum().item()
except libremote.ConnectionFailed as exc:
    out = {"type": type(exc).__name__, "message": str(exc)}
except Exception as exc:
    out = {"type": type(exc).__name__, "message": str(exc)}
print(json.dumps(out), flush=True)
