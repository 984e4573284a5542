"""Graph mode and captured steps on cuda:1 (the second of two daemons) while the current device
stays cuda:0: trains a torch.compile'd model three steps on cuda:1 against local CPU, captures a
whole SGD step there with libremote.capture_step and replays it three times against the same
steps run locally, and tries to capture a step that moves a tensor to cuda:0.

Prints {"local", "remote" (losses), "compiles", "graph_runs" (each daemon's count), "captured",
"captured_local" (losses), "capture_across" (the CaptureError's message, or null)}.

Environment: LIBREMOTE_SERVER (two daemons: tcp://a,tcp://b).
"""

import copy
import json

import torch

import libremote
from libremote.client import runtime
from libremote_wire.messages import Cmd

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
x, y = torch.randn(4, 8), torch.randn(4, 1)


def train(net, device):
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    losses = []
    for _ in range(3):
        loss = torch.nn.functional.mse_loss(net(x.to(device)), y.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


out = {"local": train(copy.deepcopy(model), "cpu")}
compiled = torch.compile(copy.deepcopy(model).to("cuda:1"))  # the current device stays cuda:0
out["remote"] = train(compiled, "cuda:1")
out["compiles"] = compiled.compiles
out["graph_runs"] = [runtime.session_for(i).request([Cmd.QUERY, "stats"])[0]["graph_runs"] for i in range(2)]

# a whole step captured on cuda:1 (libremote.capture_step) replays on its daemon
local = copy.deepcopy(model)
captured = copy.deepcopy(model).to("cuda:1")
optimizers = [torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9) for net in (local, captured)]


def train_step(xb, yb):
    loss = torch.nn.functional.mse_loss(captured(xb), yb)
    optimizers[1].zero_grad(set_to_none=False)
    loss.backward()
    optimizers[1].step()
    return loss.detach()


step = libremote.capture_step(train_step, x.to("cuda:1"), y.to("cuda:1"))  # runs it twice
local_losses = []
for _ in range(5):
    loss = torch.nn.functional.mse_loss(local(x), y)
    optimizers[0].zero_grad()
    loss.backward()
    optimizers[0].step()
    local_losses.append(loss.item())
out["captured"] = [step(x.to("cuda:1"), y.to("cuda:1")).item() for _ in range(3)]
out["captured_local"] = local_losses[2:]
try:
    libremote.capture_step(lambda v: (v * 2).to("cuda:0"), x.to("cuda:1"))
    out["capture_across"] = None
except libremote.CaptureError as exc:
    out["capture_across"] = str(exc)
print(json.dumps(out))
