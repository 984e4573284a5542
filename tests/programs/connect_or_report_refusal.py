"""Connects once: prints {"admitted": true}, or the ConnectionFailed it got instead.

Environment: LIBREMOTE_SERVER (the daemon), LIBREMOTE_QUEUE_TIMEOUT.
"""

import json

import torch

import libremote

try:
    torch.ones(1).cuda()
    print(json.dumps({"admitted": True}))
except libremote.ConnectionFailed as exc:
    print(json.dumps({"admitted": False, "type": type(exc).__name__, "message": str(exc)}))
