"""Uploads 256 MiB and frees it, three times, then computes a small sum: the daemon's host buffers
are used and freed.

Prints {"sum": ...}.

Environment: ADDRESS (the daemon, for libremote.connect).
"""

import json
import os

import torch

import libremote

libremote.connect(os.environ["ADDRESS"])
host = torch.ones(64 << 20)                        # 256 MiB, uploaded and freed three times
for _ in range(3):
    x = host.cuda()
    torch.cuda.synchronize()
    del x
torch.cuda.synchronize()
print(json.dumps({"sum": torch.ones(4, device="cuda").sum().item()}))
