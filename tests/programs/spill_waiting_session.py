"""Holds a 4 MiB tensor, idles while another session spills it, then reads it back while the
other session's long batch runs.

Writes DIR/W.in when its tensor is made and waits for DIR/W.go. Prints {"total", "spilled_a"
(the device's spilled bytes before the read), "prefetches", "restores" (during the read)}.

Environment: LIBREMOTE_SERVER (the daemon), DIR.
"""

import json
import os
import time
from pathlib import Path

import torch

import libremote

folder, MiB = Path(os.environ["DIR"]), 1 << 20
a = torch.full((MiB,), 5.0, device="cuda")            # 4 MiB; the budget holds three such
torch.cuda.synchronize()
(folder / "W.in").touch()
while not (folder / "W.go").exists():                 # meanwhile the other session spills a
    time.sleep(0.05)
before = libremote.memory_stats()["device"]
total = a.sum().item()                                # one small batch, sent while the other
after = libremote.memory_stats()["device"]            # session's long batch runs
print(json.dumps({"total": total, "spilled_a": before["spilled_bytes"],
                  **{k: after[k] - before[k] for k in ("prefetches", "restores")}}), flush=True)
