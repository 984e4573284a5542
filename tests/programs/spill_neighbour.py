"""The neighbour of spill_exhaust_both_budgets.py: holds 1 MiB and checks computations on it in
three phases.

For each phase (before, during, after) it waits for DIR/B.go.PHASE and writes DIR/B.PHASE: "OK",
"WRONG", or the exception it got. Prints {"done": true}.

Environment: LIBREMOTE_SERVER (the daemon), DIR, LIBREMOTE_PRIORITY.
"""

import json
import os
import time
from pathlib import Path

import torch

folder = Path(os.environ["DIR"])
g = torch.Generator().manual_seed(5)
x_h = torch.randint(-8, 9, (512, 512), generator=g).float()    # 1 MiB
x = x_h.cuda()

def check(phase):
    y = x * 2 + 1
    p = x[:64] @ x[:64].t()
    ok = (torch.equal(y.cpu(), x_h * 2 + 1) and torch.equal(p.cpu(), x_h[:64] @ x_h[:64].t())
          and y.sum().item() == (x_h * 2 + 1).sum().item())
    del y, p
    torch.cuda.synchronize()
    (folder / f"B.{phase}").write_text("OK" if ok else "WRONG")

for phase in ("before", "during", "after"):
    while not (folder / f"B.go.{phase}").exists():
        time.sleep(0.02)
    try:
        check(phase)
    except Exception as exc:
        (folder / f"B.{phase}").write_text(f"{type(exc).__name__}: {exc}")
print(json.dumps({"done": True}), flush=True)
