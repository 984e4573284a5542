"""Trains a small MLP with Adam locally and then through the daemon, from the same seed.

Opens its session, writes DIR/NAME.in (its session id) and waits for DIR/go, so that every
client trains at once; prints {"name", "local", "remote", "local_params", "remote_params"}
(losses and parameter sums).

Environment: LIBREMOTE_SERVER (the daemon), SEED, NAME, DIR.
"""

import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import libremote

seed, name, folder = int(os.environ["SEED"]), os.environ["NAME"], Path(os.environ["DIR"])

def train(device):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(seed + 1)
    inputs = torch.randn(128, 16, generator=data).to(device)
    targets = torch.randn(128, 1, generator=data).to(device)
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        loss = F.mse_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, [p.detach().cpu().sum().item() for p in model.parameters()]

local_losses, local_params = train("cpu")
assert torch.zeros(1, device="cuda").sum().item() == 0.0  # opens the session
(folder / (name + ".in")).write_text(libremote.server_info()["session"])
while not (folder / "go").exists():  # everyone starts together
    time.sleep(0.02)
remote_losses, remote_params = train("cuda")
print(json.dumps({"name": name, "local": local_losses, "remote": remote_losses,
                  "local_params": local_params, "remote_params": remote_params}), flush=True)
