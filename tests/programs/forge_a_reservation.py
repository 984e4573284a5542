"""A client that presents a reservation the pool never made (its handshake is patched to send a
forged one) to a pool daemon.

Prints {"refused": MESSAGE} when the daemon turns the session away (it checks reservations in etcd).

Environment: LIBREMOTE_SERVER (a daemon of an etcd pool, by its own address).
"""

import json

import torch

import libremote
from libremote.client import session

original = session.Connection.handshake


def handshake(self, *args, **kwargs):
    kwargs["reservation"] = "0123456789abcdef:not-the-secret"
    return original(self, *args, **kwargs)


session.Connection.handshake = handshake
try:
    torch.ones(2, device="cuda").sum().item()
except libremote.ConnectionFailed as exc:
    print(json.dumps({"refused": str(exc)}))
