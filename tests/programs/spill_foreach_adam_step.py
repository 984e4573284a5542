"""Three foreach Adam steps over 4 parameters of 4 MiB (32 MiB of operands with their gradients),
locally and on the daemon.

Prints {"equal": per parameter, remote equals local bit for bit, "peak": the device's peak
resident bytes, "budget", "evictions"}.

Environment: LIBREMOTE_SERVER (the daemon).
"""

import json

import torch

import libremote

torch.manual_seed(0)
params = [torch.randn(1024, 1024) for _ in range(4)]        # 4 MiB each
grads = [torch.randn(1024, 1024) for _ in range(4)]
remote = [p.cuda().requires_grad_() for p in params]
local = [p.clone().requires_grad_() for p in params]
for tensors, grad_list in ((remote, [g.cuda() for g in grads]), (local, grads)):
    for t, g in zip(tensors, grad_list):
        t.grad = g
for tensors in (remote, local):
    optimizer = torch.optim.Adam(tensors, lr=0.1, foreach=True)
    for _ in range(3):
        optimizer.step()
stats = libremote.memory_stats()["device"]
print(json.dumps({"equal": [torch.equal(rem.detach().cpu(), loc.detach()) for rem, loc in zip(remote, local)],
                  "peak": stats["peak_resident_bytes"], "budget": stats["device_budget"],
                  "evictions": stats["evictions"]}))
