"""Trains a compiled MLP (BatchNorm, dropout) and a compiled transformer layer for 8 steps, a new
batch every step, keeping every step's layer output past the next call.

Saves the state of both, and the kept outputs stacked ("kept"), to the path in argv[1]
(torch.save); prints {"losses", "replays", "captures", "interpreted"} (the last three:
libremote.session_stats()).

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
layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.1, batch_first=True).cuda()
compiled_model, compiled_layer = torch.compile(model), torch.compile(layer)
optimizer = torch.optim.AdamW([*model.parameters(), *layer.parameters()], lr=1e-3)
torch.cuda.manual_seed(1234)
losses, kept = [], []
for _step in range(8):
    x = torch.randn(32, 64, device="cuda")  # a new batch every step: copied into the captured input
    tokens = torch.randn(32, 256, 64, device="cuda")  # a 2 MiB output: handed out of the pool, not cloned
    y = torch.randint(0, 10, (32,), device="cuda")
    out = compiled_layer(tokens)
    kept.append(out)  # kept past the next call: a replay must not overwrite it
    loss = nn.functional.cross_entropy(compiled_model(x), y) + out.square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
state = {k: v.cpu() for k, v in [*model.state_dict().items(), *(("layer." + k, v) for k, v in layer.state_dict().items())]}
state["kept"] = torch.stack([k.detach().cpu() for k in kept])
torch.save(state, sys.argv[1])
stats = libremote.session_stats()
print(json.dumps({"losses": losses, "replays": stats["cuda_graph_replays"], "captures": stats["cuda_graph_captures"],
                  "interpreted": stats["cuda_graph_interpreted"]}))
