"""Opens a session, does some work, announces itself with DIR/NAME.in (holding its session id),
holds its tensors until DIR/NAME.go exists, then prints its session id and exits (saying
goodbye): the operations tests' stand-in for a session in use.

Environment: LIBREMOTE_SERVER (the daemon), NAME, DIR, and LIBREMOTE_TENANT where the test sets it.
"""

import os
import time
from pathlib import Path

import torch

import libremote

name, folder = os.environ["NAME"], Path(os.environ["DIR"])
x = torch.ones(256, 256, device="cuda")
for _ in range(20):
    x = x * 1.0001 + 0.5
assert x.sum().item() > 0
y = x.cpu()
session = libremote.server_info()["session"]
(folder / (name + ".tmp")).write_text(session)
os.replace(folder / (name + ".tmp"), folder / (name + ".in"))
while not (folder / (name + ".go")).exists():
    time.sleep(0.05)
print(session, flush=True)
