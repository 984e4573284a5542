"""Allocates and reads its tensors step by step, as the test says, reporting its memory figures.

Makes COUNT host tensors of ELEMENTS floats; at DIR/NAME.alloc1 uploads the first FIRST of
them, at DIR/NAME.alloc2 the rest, at DIR/NAME.read reads every one back and compares. After
each step it writes DIR/NAME.STEP.json ({"stats": libremote.memory_stats(), ...}); at
DIR/NAME.exit it prints {"name", "ok"} and exits.

Environment: LIBREMOTE_SERVER (the daemon), NAME, DIR, COUNT, FIRST, ELEMENTS,
LIBREMOTE_TENANT, LIBREMOTE_TOKEN, LIBREMOTE_PRIORITY.
"""

import json
import os
import time
from pathlib import Path

import torch

import libremote

name, folder, count = os.environ["NAME"], Path(os.environ["DIR"]), int(os.environ["COUNT"])
elements = int(os.environ["ELEMENTS"])
g = torch.Generator().manual_seed(len(name))
host = [torch.randint(-8, 9, (elements,), generator=g).float() for _ in range(count)]

def wait(step):
    while not (folder / f"{name}.{step}").exists():
        time.sleep(0.02)

def report(step, **extra):
    stats = libremote.memory_stats()
    (folder / f"{name}.{step}.tmp").write_text(json.dumps({"stats": stats, **extra}))
    os.replace(folder / f"{name}.{step}.tmp", folder / f"{name}.{step}.json")

wait("alloc1")
first = int(os.environ["FIRST"])
dev = [h.cuda() for h in host[:first]]
torch.cuda.synchronize()
report("alloc1")
wait("alloc2")
dev += [h.cuda() for h in host[first:]]
torch.cuda.synchronize()
report("alloc2")
wait("read")
sums = [d.sum().item() for d in dev]          # one storage at a time
ok = sums == [h.sum().item() for h in host] and all(torch.equal(d.cpu(), h) for d, h in zip(dev, host))
report("read", ok=ok)
wait("exit")
print(json.dumps({"name": name, "ok": ok}), flush=True)
