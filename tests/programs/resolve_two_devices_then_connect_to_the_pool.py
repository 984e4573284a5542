"""The pool's API by hand: ``pool.resolve`` two devices (then release them), then
``libremote.connect(POOL)`` and a computation.

Prints {"placements": [[address, device, node, daemon, has_reservation], ...], "equal": whether
the computation matched local torch, "address": the daemon the session went to}.

Environment: POOL (the pool, etcd://...; no LIBREMOTE_SERVER).
"""

import json
import os

import torch

import libremote
from libremote import pool

placements = pool.resolve(os.environ["POOL"], pool.Request(devices=2, memory=1 << 30))
rows = [[p.address, p.device, p.node, p.daemon, bool(p.reservation)] for p in placements]
pool.release()
libremote.connect(os.environ["POOL"])
x = torch.arange(6.0).reshape(2, 3)
print(json.dumps({"placements": rows, "equal": torch.equal((x.cuda() * 2).cpu(), x * 2),
                  "address": libremote.client.runtime.current().address}))
libremote.disconnect()
