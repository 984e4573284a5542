"""Moves a tensor through cuda:0, cuda:1 and cuda:2, whose LIBREMOTE_SERVER entries pin devices
of two daemons (ADDRESS#N), and asks each daemon's status which of its devices this process's
session holds.

Prints {"value": the result, "count": torch.cuda.device_count(), "sessions": sessions open,
"FIRST", "SECOND": the devices of this process's session on that daemon, one list per session}.

Environment: LIBREMOTE_SERVER (entries ADDRESS#N over two daemons), FIRST and SECOND (the two
daemons' addresses; they run with --loopback-admin).
"""

import json
import os

import torch

from libremote.client import runtime
from libremote_wire.cli import query_status

x = torch.arange(6.0, device="cuda:0")
y = (x.to("cuda:1") + 1).to("cuda:2")
out = {"value": y.cpu().tolist(), "count": torch.cuda.device_count(), "sessions": len(runtime.sessions())}
for name in ("FIRST", "SECOND"):
    report = query_status(os.environ[name])
    out[name] = [row["devices"] for row in report["sessions"] if row.get("pid") == os.getpid()]
print(json.dumps(out))
