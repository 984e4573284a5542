"""Trains an MLP with capturable Adam through libremote.capture_step: one eager step, then 10 replays.

SET_TO_NONE ("True" or "False") is passed to ``zero_grad(set_to_none=...)``. Prints {"losses":
[first, last], "params": a SHA-256 of the parameters' bytes, "allocated", "evictions"}.

Environment: LIBREMOTE_SERVER (the daemon), SET_TO_NONE.
"""

import hashlib
import json
import os

import torch
from torch import nn

import libremote

SET_TO_NONE = {"True": True, "False": False}[os.environ["SET_TO_NONE"]]
torch.manual_seed(0)
width = 768
model = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(6)],
                      nn.Linear(width, 1)).cuda()
opt = torch.optim.Adam(model.parameters(), lr=1e-4, capturable=True)
x, y = torch.randn(64, width, device="cuda"), torch.randn(64, 1, device="cuda")
def train(x, y):
    loss = nn.functional.mse_loss(model(x), y)
    opt.zero_grad(set_to_none=SET_TO_NONE); loss.backward(); opt.step()
    return loss
first = train(x, y).item()
step = libremote.capture_step(train, x, y)
for _ in range(10):                  # replays queued back to back, one sync at the end
    loss = step(x, y)
losses = [first, loss.item()]
digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in model.parameters())).hexdigest()
print(json.dumps({"losses": losses, "params": digest, "allocated": libremote.memory_stats()["allocated"],
                  "evictions": libremote.memory_stats().get("device", {}).get("evictions", 0)}))
