"""Fills a budget of three 4 MiB tensors, then in one batch makes a fourth and reads the least
recently used one.

Prints {"value", "restores", "evictions"} (the last two: during that batch).

Environment: LIBREMOTE_SERVER (the daemon).
"""

import json

import torch

import libremote

MiB = 1 << 20
a = torch.ones(MiB, device="cuda")          # 4 MiB each; budget 12 MiB holds three
c = torch.full((MiB,), 2.0, device="cuda")
d = torch.full((MiB,), 3.0, device="cuda")
torch.cuda.synchronize()
d.add_(0); a.add_(0); torch.cuda.synchronize()   # c is now the least recently used
before = libremote.memory_stats()["device"]
# One batch: making b evicts something; the next op uses c. LRU alone would spill c and
# bring it straight back; looking at the queue spills another one instead.
b = torch.full((MiB,), 4.0, device="cuda")
total = (c * 2).sum()
value = total.item()
after = libremote.memory_stats()["device"]
print(json.dumps({"value": value, "restores": after["restores"] - before["restores"],
                  "evictions": after["evictions"] - before["evictions"]}))
