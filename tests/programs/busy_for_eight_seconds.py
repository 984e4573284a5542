"""Keeps sending work, a sync point each round, for 8 seconds (longer than the idle timeout).

Prints {"rounds": ..., "value": ...}.

Environment: LIBREMOTE_SERVER (the daemon).
"""

import json
import time

import torch

x = torch.ones(100, device="cuda")
torch.cuda.synchronize()  # the session's first BATCH, as soon as it opens
rounds, start = 0, time.monotonic()
while time.monotonic() - start < 8.0:  # keeps sending work for longer than the idle timeout
    x = (x * 1.0001).contiguous()
    x.sum().item()
    rounds += 1
print(json.dumps({"rounds": rounds, "value": x[0].item()}), flush=True)
