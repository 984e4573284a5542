"""Computes, writes the file READY, waits for the file GO (meanwhile the test kills the daemon),
then tries a sync point, and another one.

Prints the first exception's type and message, the seconds it took, and the second's message
("second").

Environment: LIBREMOTE_SERVER (the daemon), LIBREMOTE_HEARTBEAT, READY, GO.
"""

import json
import os
import time

import torch

import libremote

x = torch.arange(10.0).cuda()
y = x * 2
assert y.sum().item() == 90.0
open(os.environ["READY"], "w").close()
while not os.path.exists(os.environ["GO"]):
    time.sleep(0.05)
out = {}
start = time.monotonic()
try:
    (y + 1).sum().item()
except libremote.ConnectionFailed as exc:
    out = {"type": type(exc).__name__, "message": str(exc)}
except Exception as exc:
    out = {"type": type(exc).__name__, "message": str(exc)}
out["seconds"] = time.monotonic() - start
# Once broken, it stays broken with the same clear error.
try:
    x.cpu()
except libremote.ConnectionFailed as exc:
    out["second"] = str(exc)
print(json.dumps(out), flush=True)
