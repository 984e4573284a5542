"""One of several clients that together hold 3x the device budget: elementwise ops, matmuls, in-place
updates and a 4 MiB fetch every round, compared with local torch.

Uploads 16 MiB, writes DIR/NAME.in (its session id) and waits for DIR/go (everyone starts
together); after its work writes DIR/NAME.done and holds its data until DIR/exit exists. Prints
{"name", "result": "OK" or "WRONG", "problems", "stats"}.

Environment: LIBREMOTE_SERVER (the daemon), NAME, DIR, SEED.
"""

import json
import os
import time
from pathlib import Path

import torch

import libremote

name, folder, seed = os.environ["NAME"], Path(os.environ["DIR"]), int(os.environ["SEED"])
MiB = 1 << 20

def work(ts, device, rounds=6):
    ts = list(ts)
    results = []
    for r in range(rounds):
        for i in range(len(ts)):
            ts[i] = torch.remainder(ts[i] * (seed + 2) + ts[i - 1], 17) - 8
        p = ts[0] @ ts[1]
        ts[2].add_(torch.remainder(p, 17)).remainder_(17).sub_(8)
        ts[3].mul_(-1).add_(ts[2].t()).remainder_(17).sub_(8)
        results.append(p.cpu())                               # a 4 MiB fetch every round
        results.append(torch.stack([t.sum() for t in ts]).cpu())
        results.append(ts[r % len(ts)].cpu())
    return ts, results

g = torch.Generator().manual_seed(seed)
host = [torch.randint(-8, 9, (1024, 1024), generator=g).float() for _ in range(4)]   # 16 MiB
local_ts, local_results = work([h.clone() for h in host], "cpu")

dev = [h.cuda() for h in host]
torch.cuda.synchronize()
(folder / (name + ".in")).write_text(libremote.server_info()["session"])
while not (folder / "go").exists():          # everyone starts together
    time.sleep(0.02)
remote_ts, remote_results = work(dev, "cuda")
problems = [f"result {i}" for i, (loc, rem) in enumerate(zip(local_results, remote_results)) if not torch.equal(loc, rem)]
for kind, pairs in (("tensor", zip(local_ts, remote_ts)), ("upload", zip(host, dev))):
    for i, (loc, rem) in enumerate(pairs):
        if not torch.equal(loc, rem.cpu()):
            # Diagnosis only: a second fetch tells a corrupted reply from corrupted data.
            again = "right" if torch.equal(loc, rem.cpu()) else "wrong"
            problems.append(f"{kind} {i} (fetched again: {again})")
stats = libremote.memory_stats()
(folder / (name + ".done")).write_text("1")
while not (folder / "exit").exists():        # hold the data while the test reads the status
    time.sleep(0.02)
print(json.dumps({"name": name, "result": "OK" if not problems else "WRONG", "problems": problems,
                  "stats": stats}), flush=True)
