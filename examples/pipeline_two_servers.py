"""A plain PyTorch pipeline split over two GPUs: no libremote in it anywhere.

With two daemons named in the environment, cuda:0 is on the first and cuda:1 on the second; the
activations and their gradients move between the servers daemon to daemon:

    libremote-server --listen tcp://127.0.0.1:7777 &
    libremote-server --listen tcp://127.0.0.1:7778 &
    LIBREMOTE_SERVER=tcp://127.0.0.1:7777,tcp://127.0.0.1:7778 python examples/pipeline_two_servers.py

On a machine with two local GPUs it runs as it is; with fewer, on the CPU.
"""

import torch
from torch import nn

two = torch.cuda.is_available() and torch.cuda.device_count() >= 2
first, second = ("cuda:0", "cuda:1") if two else ("cpu", "cpu")
if two:
    print(f"stage 1 on {torch.cuda.get_device_name(0)}, stage 2 on {torch.cuda.get_device_name(1)}")

torch.manual_seed(0)
stage1 = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU()).to(first)
stage2 = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1)).to(second)
optimizer = torch.optim.SGD([*stage1.parameters(), *stage2.parameters()], lr=0.05, momentum=0.9)
inputs, targets = torch.randn(256, 32), torch.randn(256, 1)

for step in range(5):
    hidden = stage1(inputs.to(first))
    loss = nn.functional.mse_loss(stage2(hidden.to(second)), targets.to(second))
    optimizer.zero_grad()
    loss.backward()  # the gradient of `hidden` goes back from the second server to the first
    optimizer.step()
    print(f"step {step}: loss {loss.item():.4f}")
