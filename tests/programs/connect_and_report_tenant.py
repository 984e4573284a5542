"""Connects and reports what the daemon made of it: its tenant, priority and memory quota.

Prints {"admitted": true, "tenant", "priority", "memory_quota"}, or {"admitted": false,
"message"} when the daemon refuses it.

Environment: LIBREMOTE_SERVER (the daemon); LIBREMOTE_TENANT, LIBREMOTE_TOKEN and
LIBREMOTE_PRIORITY as the test chooses.
"""

import json

import torch

import libremote

try:
    torch.ones(1).cuda()
    info = libremote.server_info()
    print(json.dumps({"admitted": True, "tenant": info.get("tenant"), "priority": info.get("priority"),
                      "memory_quota": info.get("memory_quota")}))
except libremote.ConnectionFailed as exc:
    print(json.dumps({"admitted": False, "message": str(exc)}))
