"""The busy session beside spill_waiting_session.py: holds 12 MiB (spilling the other's tensor),
frees 4 MiB of it, then streams 3000 small ops.

Writes DIR/W.go once its ops are queued (so that the waiting session sends its work while these
run) and checks its results; prints nothing.

Environment: LIBREMOTE_SERVER (the daemon), DIR, LIBREMOTE_BATCH.
"""

import os
from pathlib import Path

import torch

folder, MiB = Path(os.environ["DIR"]), 1 << 20
held = [torch.full((MiB,), 9.0, device="cuda") for _ in range(3)]   # spills the other's a
torch.cuda.synchronize()
del held[0]                                           # room for a again
s = torch.zeros(4, device="cuda")
for _ in range(3000):                                 # batches of 1024 small ops
    s = s + 1
(folder / "W.go").touch()
assert s.sum().item() == 4 * 3000 and all(t.sum().item() == 9.0 * MiB for t in held)
