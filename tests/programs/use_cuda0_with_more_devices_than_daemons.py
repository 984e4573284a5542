"""Uses cuda:0 when LIBREMOTE_DEVICES does not agree with the daemons LIBREMOTE_SERVER names.

Prints {"error": the NotConfiguredError's message, or null if it worked}.

Environment: LIBREMOTE_SERVER (two daemons), LIBREMOTE_DEVICES (another count).
"""

import json

import torch

import libremote

try:
    torch.ones(1, device="cuda:0")
    print(json.dumps({"error": None}))
except libremote.NotConfiguredError as exc:
    print(json.dumps({"error": str(exc)}))
