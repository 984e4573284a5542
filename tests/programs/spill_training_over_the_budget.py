"""Trains 4 layers of 1024x1024 with Adam locally and through the daemon: weights, gradients and
Adam's two moments are 64 MiB, 4x a 16 MiB budget.

Compares losses, parameters and optimizer state with local torch (assert_close: the script
fails if they differ), then prints {"local", "remote", "stats": libremote.memory_stats() after
each step}.

Environment: LIBREMOTE_SERVER (the daemon).
"""

import json

import torch
import torch.nn.functional as F
from torch import nn

import libremote

MiB = 1 << 20

def train(device):
    torch.manual_seed(0)
    # 4 layers of 1024x1024 (16 MiB of weights), Adam: weights + grads + 2 moments = 64 MiB,
    # 4x the 16 MiB budget. (No single op needs more than 12 MiB resident at once.)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                          nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = torch.Generator().manual_seed(1)
    inputs = torch.randn(32, 1024, generator=data).to(device)
    targets = torch.randn(32, 1024, generator=data).to(device)
    losses, stats = [], []
    for _ in range(4):
        optimizer.zero_grad()
        loss = F.mse_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if device != "cpu":
            stats.append(libremote.memory_stats())
    params = [p.detach().cpu() for p in model.parameters()]
    state = [s.cpu() for p in model.parameters() for s in (optimizer.state[p]["exp_avg"], optimizer.state[p]["exp_avg_sq"])]
    return losses, params, state, stats

local_losses, local_params, local_state, _ = train("cpu")
remote_losses, remote_params, remote_state, stats = train("cuda")
torch.testing.assert_close(torch.tensor(remote_losses), torch.tensor(local_losses), rtol=1e-5, atol=1e-6)
# Adam divides by sqrt(exp_avg_sq): where that is tiny, a last-bit difference in a gradient
# (the daemon's matmul may split its reduction across threads differently from this process)
# moves a weight by ~lr * 1e-3. Spilling bugs show as wrong values, far beyond this tolerance.
for name, remote, local in (("param", remote_params, local_params), ("state", remote_state, local_state)):
    for i, (rem, loc) in enumerate(zip(remote, local)):
        torch.testing.assert_close(rem, loc, rtol=1e-4, atol=2e-5, msg=lambda m, name=name, i=i: f"{name} {i}: {m}")
print(json.dumps({"local": local_losses, "remote": remote_losses, "stats": stats}), flush=True)
