"""A captured training step of a linear model: its outputs are the same tensors every replay, a
view made of them sees each replay's values, and a weight replaced after the capture makes the
next replay an error.

Prints {"same": per replay, the output is the first replay's tensor, "seen": per replay, the
loss and the view's value, "error": what replaying after the replacement raised, "replays",
"interpreted"} (the last two: libremote.session_stats()).

Environment: TEST_SERVER (the daemon, for libremote.connect).
"""

import json
import os

import torch
from torch import nn

import libremote

libremote.connect(os.environ["TEST_SERVER"])
torch.manual_seed(0)
model = nn.Linear(8, 1).cuda()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

def train_step(x, y):
    loss = nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad(set_to_none=False)
    loss.backward()
    optimizer.step()
    return loss

step = libremote.capture_step(train_step, torch.randn(4, 8, device="cuda"), torch.randn(4, 1, device="cuda"))
first = step(torch.randn(4, 8, device="cuda"), torch.randn(4, 1, device="cuda"))
view = first.reshape(1)  # made after the capture, on the step's output
same, seen = [], []
for _ in range(6):
    out = step(torch.randn(4, 8, device="cuda"), torch.randn(4, 1, device="cuda"))
    same.append(out is first)
    seen.append([out.item(), view.item()])
model.weight.data = torch.zeros(1, 8, device="cuda")  # the step reads the old weight's handle
try:
    step(torch.randn(4, 8, device="cuda"), torch.randn(4, 1, device="cuda"))
    torch.cuda.synchronize()
    error = None
except Exception as exc:
    error = str(exc)
stats = libremote.session_stats()
print(json.dumps({"same": same, "seen": seen, "error": error, "replays": stats["cuda_graph_replays"],
                  "interpreted": stats["cuda_graph_interpreted"]}))
