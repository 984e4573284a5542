"""An idle session that fills the budget (3 x 4 MiB), writes DIR/B.in, and holds its tensors until
DIR/B.exit exists; then checks them (a failed check exits non-zero).

Environment: LIBREMOTE_SERVER (the daemon), DIR.
"""

import os
import time
from pathlib import Path

import torch

folder, MiB = Path(os.environ["DIR"]), 1 << 20
held = [torch.full((MiB,), 9.0, device="cuda") for _ in range(3)]   # fills the budget
torch.cuda.synchronize()
(folder / "B.in").touch()
while not (folder / "B.exit").exists():
    time.sleep(0.05)
assert all(t.sum().item() == 9.0 * MiB for t in held)
