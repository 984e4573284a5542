"""Fetches the same 6 MiB tensor 300 times and compares each fetch with the local copy.

Writes DIR/fetcher.in when ready and starts at DIR/go. Prints {"wrong": the rounds that
returned other bytes}.

Environment: LIBREMOTE_SERVER (the daemon), DIR.
"""

import json
import os
import time
from pathlib import Path

import torch

folder = Path(os.environ["DIR"])
g = torch.Generator().manual_seed(0)
x_h = torch.randn(1536 * 1024, generator=g)          # 6 MiB
x = x_h.cuda()
torch.cuda.synchronize()
(folder / "fetcher.in").touch()
while not (folder / "go").exists():
    time.sleep(0.02)
wrong = [i for i in range(300) if not torch.equal(x.cpu(), x_h)]
print(json.dumps({"wrong": wrong}), flush=True)
