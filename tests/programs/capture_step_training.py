"""Trains a compiled MLP (BatchNorm, dropout, capturable AdamW) for 8 steps through
libremote.capture_step.

Saves the model's state to the path in argv[1] (torch.save) and prints {"losses", "replays",
"captures", "interpreted"} (the last three: libremote.session_stats()).

Environment: TEST_SERVER (the daemon, for libremote.connect). Argument: the state file.
"""

import json
import os
import sys

import torch
from torch import nn

import libremote

libremote.connect(os.environ["TEST_SERVER"])
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Dropout(0.1), nn.Linear(256, 10)).cuda()
compiled = torch.compile(model)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, capturable=True)
torch.cuda.manual_seed(1234)

def train_step(x, y):
    loss = nn.functional.cross_entropy(compiled(x), y)
    optimizer.zero_grad(set_to_none=False)
    loss.backward()
    optimizer.step()
    return loss

step = libremote.capture_step(train_step, torch.randn(32, 64, device="cuda"), torch.randint(0, 10, (32,), device="cuda"))
losses = [step(torch.randn(32, 64, device="cuda"), torch.randint(0, 10, (32,), device="cuda")).item() for _ in range(8)]
state = {k: v.cpu() for k, v in model.state_dict().items()}
torch.save(state, sys.argv[1])
stats = libremote.session_stats()
print(json.dumps({"losses": losses, "replays": stats["cuda_graph_replays"], "captures": stats["cuda_graph_captures"],
                  "interpreted": stats["cuda_graph_interpreted"]}))
