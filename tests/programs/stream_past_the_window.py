"""Streams STEPS one-op batches that want no reply (run with LIBREMOTE_BATCH=1), then round-trips a
40 MiB tensor four times (uploads in 8 MiB pieces).

Prints the counter's values, the big tensor's last byte, and whether its sum is right.

Environment: LIBREMOTE_SERVER (the daemon), LIBREMOTE_BATCH, STEPS.
"""

import os

import torch

x = torch.zeros(4, device="cuda")
for _ in range(int(os.environ["STEPS"])):
    x.add_(1)           # one batch per op (LIBREMOTE_BATCH=1), none asks for a reply
big = torch.arange(40 << 20, dtype=torch.uint8).to("cuda")  # 40 MiB in 8 MiB pieces, 4 times
for _ in range(4):
    big = big.to("cpu").to("cuda")
print(x.tolist(), int(big[-1].item()), int(big.sum().item()) == int(torch.arange(40 << 20, dtype=torch.uint8).sum()))
