"""Places itself on node n1 of the pool, then opens a session whose HELLO pins the other device
than the one its reservation holds.

Prints {"refused": the ConnectionFailed message, "kind": its kind} ({"refused": null} if the
session opened).

Environment: POOL (the pool's etcd:// address; no LIBREMOTE_SERVER).
"""

import json
import os

import libremote
from libremote import pool
from libremote.client.session import ClientSession
from libremote.config import Settings

placement, = pool.resolve(os.environ["POOL"], pool.Request(node="n1"))
try:
    ClientSession(Settings.from_env(), placement.address, libremote.__version__, devices=1,
                  device_indices=[1 - placement.device], reservation=placement.reservation)
    print(json.dumps({"refused": None}))
except libremote.ConnectionFailed as exc:
    print(json.dumps({"refused": str(exc), "kind": exc.kind}))
pool.release()
