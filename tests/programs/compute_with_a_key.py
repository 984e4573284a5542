"""Computes relu(a @ b).sum(dim=0) from seeded inputs and reports the tenant the daemon gave it.

Prints {"out": the result, "tenant": libremote.server_info()["tenant"]}.

Environment: LIBREMOTE_SERVER (the daemon), LIBREMOTE_CLIENT_KEY, LIBREMOTE_SERVER_KEY,
LIBREMOTE_TENANT (a claim the key overrides).
"""

import json

import torch

import libremote

g = torch.Generator().manual_seed(7)
a, b = torch.randn(16, 32, generator=g), torch.randn(32, 8, generator=g)
out = torch.relu(a.cuda() @ b.cuda()).sum(dim=0)
print(json.dumps({"out": out.cpu().tolist(), "tenant": libremote.server_info()["tenant"]}))
