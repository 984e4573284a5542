"""A client that goes straight to a pool daemon's address, without a placement from the pool.

Prints {"refused": MESSAGE} when the daemon turns the session away (the pool tests expect it to).

Environment: LIBREMOTE_SERVER (a daemon of an etcd pool, by its own address).
"""

import json

import torch

import libremote

try:
    torch.ones(2, device="cuda").sum().item()
except libremote.ConnectionFailed as exc:
    print(json.dumps({"refused": str(exc)}))
