"""Writes the file READY once connected, then streams ops without ever waiting for the daemon
until the test kills it mid-stream.

Environment: LIBREMOTE_SERVER (the daemon), READY.
"""

import os

import torch

x = torch.randn(256, 256).cuda()
assert x.sum().item() == x.sum().item()
open(os.environ["READY"], "w").close()
while True:  # stream ops without waiting for the daemon: killed mid-stream
    x = (x @ x).tanh()
