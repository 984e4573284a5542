"""An index_select with an index out of range, then a sync point; reports on which line the error
came.

Prints {"type", "message", "stage": "op" when the op's own line raised, "after": a sum computed
afterwards}. Run with LIBREMOTE_SYNC=1, every op waits for the daemon.

Environment: LIBREMOTE_SERVER (the daemon), LIBREMOTE_SYNC.
"""

import json

import torch

import libremote

x = torch.arange(6.0).cuda()
idx = torch.tensor([0, 10]).cuda()
stage = "op"
out = {}
try:
    y = torch.index_select(x, 0, idx)
    stage = "after op"
    y.sum().item()
    stage = "after sync"
except libremote.RemoteOpError as exc:
    out = {"type": type(exc).__name__, "message": str(exc)}
out["stage"] = stage
out["after"] = (x + 1).sum().item()
print(json.dumps(out))
