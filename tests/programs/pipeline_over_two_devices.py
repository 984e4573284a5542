"""Trains a pipeline split over cuda:0 and cuda:1 (stage 1 on one, stage 2 on the other: the
forward crosses between them and the backward comes back) for four SGD steps with momentum, then
the same from the same seed on local CPU.

Prints {"remote": run, "local": run, "count": torch.cuda.device_count(), "addresses": the daemon
of cuda:0 and of cuda:1, "sessions": the sessions open}; a run is {"losses", "grad_devices" (the
devices of the first layer's gradients in each stage), "weights" (every parameter, as lists)}.

Environment: LIBREMOTE_SERVER (two daemons, or a pool with LIBREMOTE_DEVICES=2).
"""

import json

import torch

from libremote.client import runtime


def run(first, second):
    torch.manual_seed(0)
    stage1 = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU())
    stage2 = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    stage1.to(first)
    stage2.to(second)
    optimizer = torch.optim.SGD([*stage1.parameters(), *stage2.parameters()], lr=0.05, momentum=0.9)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    losses = []
    for _ in range(4):
        hidden = stage1(x.to(first))
        prediction = stage2(hidden.to(second))  # forward across daemons; backward comes back
        loss = torch.nn.functional.mse_loss(prediction, y.to(second))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return {"losses": losses, "grad_devices": [str(p.grad.device) for p in (stage1[0].weight, stage2[0].weight)],
            "weights": [p.detach().cpu().tolist() for p in (*stage1.parameters(), *stage2.parameters())]}


remote = run("cuda:0", "cuda:1")
print(json.dumps({"remote": remote, "local": run("cpu", "cpu"), "count": torch.cuda.device_count(),
                  "addresses": [runtime.session_for(i).address for i in range(2)],
                  "sessions": len(runtime.sessions())}))
