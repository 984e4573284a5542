"""Computes a small sum and prints it (12.0), then holds its session until the file DONE exists.

Environment: LIBREMOTE_SERVER (the daemon), DONE, and the README's LIBREMOTE_CLIENT_KEY and
LIBREMOTE_SERVER_KEY.
"""

import os
import time

import torch

print((torch.arange(4.0, device="cuda") * 2).sum().item(), flush=True)
while not os.path.exists(os.environ["DONE"]):   # (holds its session for the status below)
    time.sleep(0.05)
