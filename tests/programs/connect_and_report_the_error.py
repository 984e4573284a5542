"""Connects once; prints {"error": None}, or the ConnectionFailed's message.

Environment: LIBREMOTE_SERVER (the daemon), LIBREMOTE_DEVICES.
"""

import json

import torch

import libremote

try:
    torch.ones(1).cuda()
    print(json.dumps({"error": None}))
except libremote.ConnectionFailed as exc:
    print(json.dumps({"error": str(exc)}))
