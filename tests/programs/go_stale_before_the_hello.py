"""Wraps libremote.pool.resolve so that the first placement (or, with LAPSE_ALWAYS=1, every one)
goes stale before the HELLO: MODE=drain drains the daemon of cuda:0 (libremote admin --drain),
MODE=lapse deletes the reservation from etcd. Then connects and computes a small matmul.

Prints {"calls": [{"daemons", "avoid"} for each resolve], and either "connect_s" (seconds to
connect), "equal" (the matmul against local torch) and "address" (the daemon it got), or "error"
(the ConnectionFailed message)}.

Environment: LIBREMOTE_SERVER (a pool; its daemons run with --loopback-admin), MODE (drain or
lapse), LAPSE_ALWAYS.
"""

import json
import os
import subprocess
import sys
import time

import torch

import libremote
from libremote import pool
from libremote.client import runtime
from libremote_wire.pool import address as pool_address
from libremote_wire.pool import records
from libremote_wire.pool.etcd import Etcd

real, calls = pool.resolve, []


def resolve(address, request=None, **kwargs):
    placements = real(address, request, **kwargs)
    calls.append({"daemons": [p.daemon for p in placements], "avoid": sorted(kwargs.get("avoid") or ())})
    if len(calls) == 1 and os.environ["MODE"] == "drain":
        done = subprocess.run([sys.executable, "-m", "libremote_wire.cli", "admin", "--server",
                               placements[0].address, "--drain"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    if os.environ["MODE"] == "lapse" and (len(calls) == 1 or os.environ.get("LAPSE_ALWAYS")):
        parsed = pool_address.parse(address)
        etcd = Etcd(parsed)
        rid = placements[0].reservation.partition(":")[0]
        etcd.delete(records.tenant_key(parsed.prefix, "anonymous", rid))
        etcd.close()
    return placements


pool.resolve = resolve
out = {"calls": calls}
try:
    x = torch.arange(12.0).reshape(3, 4)
    started = time.monotonic()
    libremote.client.runtime.current()  # (placement, the refusal, placement again, the session)
    out["connect_s"] = time.monotonic() - started
    out["equal"] = torch.equal((x.cuda() @ x.T.cuda()).cpu(), x @ x.T)
    out["address"] = runtime.current().address
except libremote.ConnectionFailed as exc:
    out["error"] = str(exc)
print(json.dumps(out))
