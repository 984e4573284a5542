"""Trains a small MLP with SGD and momentum on the pool, pausing between two halves: after 10 of
20 steps it writes DIR/half.done (the daemon's host) and waits for DIR/go. Then the same training
runs locally, from the same seed.

Prints {"losses_equal", "params_equal" (every loss and the final parameters matched local
torch exactly), "address": the daemon it trained on}.

Environment: LIBREMOTE_SERVER (a pool), LIBREMOTE_NODE, DIR.
"""

import json
import os
import time
from pathlib import Path

import torch

import libremote

folder = Path(os.environ["DIR"])


def train(device, pause):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = torch.randn(20, 64, 16)
    losses = []
    for step in range(20):
        if pause and step == 10:
            (folder / "half.done").write_text(libremote.server_info()["host"])
            while not (folder / "go").exists():
                time.sleep(0.05)
        x = data[step].to(device)
        loss = (model(x) - x[:, :1]).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, [p.detach().cpu() for p in model.parameters()]


remote_losses, remote_params = train("cuda", True)
local_losses, local_params = train("cpu", False)
print(json.dumps({"losses_equal": remote_losses == local_losses,
                  "params_equal": all(torch.equal(a, b) for a, b in zip(remote_params, local_params)),
                  "address": libremote.client.runtime.current().address}), flush=True)
