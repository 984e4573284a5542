"""Trains a small model step after step, locally and through the daemon, comparing every loss,
until DIR/stop exists.

After three steps it announces itself with DIR/NAME.in (holding its worker's pid). Prints
{"steps", "exact": every remote loss equalled the local one}.

Environment: LIBREMOTE_SERVER (the daemon), DIR, NAME, LIBREMOTE_TENANT, LIBREMOTE_TOKEN.
"""

import json
import os
from pathlib import Path

import torch

import libremote

folder = Path(os.environ["DIR"]); name = os.environ["NAME"]
torch.manual_seed(0)
local = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
remote = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
remote.load_state_dict(local.state_dict()); remote.cuda()
opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (local, remote)]
steps, exact = 0, True
while True:
    x, y = torch.randn(8, 16), torch.randn(8, 1)
    losses = []
    for model, opt, (xx, yy) in ((local, opts[0], (x, y)), (remote, opts[1], (x.cuda(), y.cuda()))):
        loss = torch.nn.functional.mse_loss(model(xx), yy)
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    exact = exact and losses[0] == losses[1]
    steps += 1
    if steps == 3:
        (folder / (name + ".in")).write_text(str(libremote.server_info()["pid"]))
    if (folder / "stop").exists() and steps > 3:
        break
print(json.dumps({"steps": steps, "exact": exact}), flush=True)
