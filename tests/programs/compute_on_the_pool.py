"""Computes relu(a @ b).sum(dim=0) on its pooled device from seeded inputs, checks the result
against local torch and reports which daemon it got.

Prints {"equal", "host", "session", "address" (the daemon), "devices": torch.cuda.device_count()}.

Environment: LIBREMOTE_SERVER (a pool or a daemon), N (the matrices' size, 64 if unset), and
whatever the test sets for placement and credentials (LIBREMOTE_DEVICES, LIBREMOTE_NODE,
LIBREMOTE_TENANT, LIBREMOTE_MEMORY, keys, ...).
"""

import json
import os

import torch

import libremote

n = int(os.environ.get("N", "64"))
torch.manual_seed(0)
a, b = torch.randn(n, n), torch.randn(n, n)
remote = (a.cuda() @ b.cuda()).relu().sum(dim=0).cpu()
local = (a @ b).relu().sum(dim=0)
info = libremote.server_info()
print(json.dumps({"equal": bool(torch.equal(remote, local)), "host": info.get("host"),
                  "session": info["session"], "address": libremote.client.runtime.current().address,
                  "devices": torch.cuda.device_count()}), flush=True)
