"""On a GPU daemon: a spilled tensor prefetched on the side stream while earlier kernels run, then
training (Adam, about 2x a small device budget) through spills and prefetches.

Saves the trained parameters to PARAMS_OUT (torch.save) and prints {"total": the prefetched
tensor's sum plus the small ops', "device": libremote.memory_stats()["device"]}.

Environment: TEST_SERVER (the daemon, for libremote.connect), PARAMS_OUT, LIBREMOTE_BATCH.
"""

import json
import os

import torch
from torch import nn

import libremote

libremote.connect(os.environ["TEST_SERVER"])
MiB = 1 << 20
# 1. A spilled tensor that queued ops will read is prefetched on the side stream while the
#    kernels before it run; the op that reads it must see its bytes, not the block's old ones.
a = torch.full((16 * MiB,), 5.0, device="cuda")              # 64 MiB each; the budget holds three
spare = [torch.zeros(16 * MiB, device="cuda") for _ in range(3)]
del spare
s = torch.zeros(4, device="cuda")
for _ in range(200):
    s = s + 1
total = (a.sum() + s.sum()).item()
# 2. Training through spills and prefetches (about 2x the budget): parameters after Adam steps.
torch.manual_seed(0)
model = nn.Sequential(*[nn.Sequential(nn.Linear(2048, 2048), nn.ReLU()) for _ in range(6)], nn.Linear(2048, 1)).cuda()
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
x, y = torch.randn(256, 2048, device="cuda"), torch.randn(256, 1, device="cuda")
for _ in range(4):
    loss = nn.functional.mse_loss(model(x), y); opt.zero_grad(); loss.backward(); opt.step()
params = [p.detach().cpu() for p in model.parameters()]
torch.save(params, os.environ["PARAMS_OUT"])
print(json.dumps({"total": total, "device": libremote.memory_stats().get("device", {})}))
