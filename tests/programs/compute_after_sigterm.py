"""Computes, writes the file READY, waits for the file GO (meanwhile the test stops the daemon),
then tries a sync point.

Prints {"type": None} if it worked, else the exception's type and message.

Environment: LIBREMOTE_SERVER (the daemon), LIBREMOTE_HEARTBEAT, READY, GO.
"""

import json
import os
import time

import torch

x = torch.ones(3).cuda()
assert x.sum().item() == 3.0
open(os.environ["READY"], "w").close()
while not os.path.exists(os.environ["GO"]):
    time.sleep(0.05)
try:
    x.sum().item()
    out = {"type": None}
except Exception as exc:
    out = {"type": type(exc).__name__, "message": str(exc)}
print(json.dumps(out), flush=True)
