"""Fills a 13 MiB budget and checks which storages are dropped rather than spilled to make room.

First a storage freed, in the same batch, right after the op that needs its room: dead, its
bytes are dropped without a copy. Then storages still alive through a view or through another
tensor moved onto them with ``set_``: spilled, not dropped. Prints {"total", "dead" (discards,
bytes_discarded, evictions of the first part), "alive", "bytes_discarded_after",
"evictions_after"}.

Environment: LIBREMOTE_SERVER (the daemon), LIBREMOTE_BATCH (large, so that the frees share a
message with the ops).
"""

import json

import torch

import libremote

MiB = 1 << 20
def stats():
    return libremote.memory_stats()["device"]

# 1. Dead: `a` is freed right after the op that needs its room.
a = torch.full((MiB,), 1.0, device="cuda")   # 4 MiB each; the budget holds three
b = torch.full((MiB,), 2.0, device="cuda")
c = torch.full((MiB,), 3.0, device="cuda")
torch.cuda.synchronize()
before = stats()
d = torch.full((MiB,), 4.0, device="cuda")   # one batch: this op, then the free of a
del a
total = (b.sum() + c.sum() + d.sum()).item()
after = stats()
dead = {k: after[k] - before[k] for k in ("discards", "bytes_discarded", "evictions")}
# 2. Not dead: a view keeps b's storage, and x was moved onto y's storage with set_.
x = torch.zeros(MiB, device="cuda")
y = torch.full((MiB,), 5.0, device="cuda")
x.set_(y)                                    # (x's own storage is released)
g = torch.full((MiB,), 7.0, device="cuda")   # the budget is full again
view = b[:16]
torch.cuda.synchronize()
before = stats()
e = torch.full((MiB,), 6.0, device="cuda")   # needs room, with the frees of y and b queued
del y, b
s = torch.zeros(4, device="cuda")
for _ in range(100):                         # the next reads of x and b's view come
    s = s + 1                                # beyond the daemon's lookahead
alive = (x.sum() + view.sum() + e.sum() + g.sum() + s.sum()).item()
after = stats()
print(json.dumps({"total": total, "dead": dead, "alive": alive,
                  "bytes_discarded_after": after["bytes_discarded"] - before["bytes_discarded"],
                  "evictions_after": after["evictions"] - before["evictions"]}))
