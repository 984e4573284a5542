"""Uses cuda:0 when one of the daemons LIBREMOTE_SERVER names does not answer, then waits up to
5 s for the reachable daemon's status to show no session of this process (it was closed).

Prints {"error": the ConnectionFailed message (null if it worked), "left_open": this process's
sessions still in the first daemon's status}.

Environment: LIBREMOTE_SERVER (a daemon, then an address nobody listens on), LIBREMOTE_TIMEOUT,
FIRST (the reachable daemon, with --loopback-admin).
"""

import json
import os
import time

import torch

import libremote
from libremote_wire.cli import query_status

try:
    torch.ones(1, device="cuda:0")
    error = None
except libremote.ConnectionFailed as exc:
    error = str(exc)
for _ in range(50):  # (the first daemon's session, opened before, was closed: BYE)
    mine = [row for row in query_status(os.environ["FIRST"])["sessions"] if row.get("pid") == os.getpid()]
    if not mine:
        break
    time.sleep(0.1)
print(json.dumps({"error": error, "left_open": mine}))
