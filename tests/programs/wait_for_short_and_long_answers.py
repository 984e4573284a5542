"""Waits for the daemon's answers, short ones (50 quick sums) and long ones (20 chained 512x512
matmuls), and compares them with local torch.

Prints {"quick": the sums, "slow": the matmuls match local torch, "varied": the result is not
degenerate}.

Environment: ADDRESS (the daemon, for libremote.connect), LIBREMOTE_SPIN_US.
"""

import json
import os

import torch

import libremote

libremote.connect(os.environ["ADDRESS"])
x = torch.arange(1024.0, device="cuda")
quick = [(x + i).sum().item() for i in range(50)]               # answers within the spin
local = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
remote = local.cuda()
for _ in range(20):                                             # a longer wait
    local, remote = torch.tanh(local @ local.T / 16), torch.tanh(remote @ remote.T / 16)
print(json.dumps({"quick": quick, "slow": torch.allclose(remote.cpu(), local, atol=1e-4),
                  "varied": local.std().item() > 0.1}))
