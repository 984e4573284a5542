"""Draws random numbers (randn, rand, randint, dropout) locally and remotely from the same seed.

After its first remote round it writes DIR/NAME.in and waits for DIR/go, so that the other
clients draw (and seed) meanwhile. With RESEED=1 it keeps re-seeding its own stream. Prints
{"name", "equal": local == remote, "remote", "first_local", "first_remote"}.

Environment: LIBREMOTE_SERVER (the daemon), SEED, RESEED, NAME, DIR.
"""

import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

seed, name, folder = int(os.environ["SEED"]), os.environ["NAME"], Path(os.environ["DIR"])
reseed = os.environ.get("RESEED") == "1"

def draws(device, seed_fn):
    seed_fn(seed)
    out = []
    for i in range(40):
        if reseed and i % 3 == 0:
            seed_fn(seed + 1000 + i)  # this client keeps re-seeding its own stream
        a = torch.randn(64, device=device)
        b = torch.rand(32, device=device)
        c = torch.randint(0, 1000, (16,), device=device)
        d = F.dropout(torch.ones(64, device=device), 0.5)
        out.append([a.tolist(), b.tolist(), c.tolist(), d.tolist()])  # a sync point per round
        if i == 0 and device != "cpu":
            (folder / (name + ".in")).write_text("1")
            while not (folder / "go").exists():  # the others draw (and seed) meanwhile
                time.sleep(0.02)
    return out

local = draws("cpu", torch.manual_seed)
remote = draws("cuda", torch.cuda.manual_seed)
print(json.dumps({"name": name, "equal": local == remote, "remote": remote,
                  "first_local": local[0][0][:4], "first_remote": remote[0][0][:4]}), flush=True)
