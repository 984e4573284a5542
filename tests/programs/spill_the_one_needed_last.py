"""Fills a budget of three 4 MiB tensors, then in one batch makes a fourth and reads all four.

Prints {"sums", "restores"} (restores: during that batch).

Environment: LIBREMOTE_SERVER (the daemon).
"""

import json

import torch

import libremote

MiB = 1 << 20
c = torch.full((MiB,), 2.0, device="cuda")   # 4 MiB each; the budget holds three
d = torch.full((MiB,), 3.0, device="cuda")
a = torch.ones(MiB, device="cuda")
torch.cuda.synchronize()
d.add_(0); a.add_(0); torch.cuda.synchronize()   # least recently used first: c, d, a
before = libremote.memory_stats()["device"]
# One batch: making b evicts one of c, d, a; the ops after it use c, then d, then a, then b.
b = torch.full((MiB,), 4.0, device="cuda")
sums = torch.stack([c.sum(), d.sum(), a.sum(), b.sum()]).cpu()
after = libremote.memory_stats()["device"]
print(json.dumps({"sums": sums.tolist(), "restores": after["restores"] - before["restores"]}))
