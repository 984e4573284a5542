"""Uses cuda twice when the daemon does not answer; both uses must raise ConnectionFailed.

Prints {"first": type, message and seconds of the first error, "second": type and message of
the second}.

Environment: LIBREMOTE_SERVER (an address nobody listens on), LIBREMOTE_TIMEOUT.
"""

import json
import time

import torch

import libremote

start = time.monotonic()
try:
    torch.ones(1).cuda()
except libremote.ConnectionFailed as exc:
    first = {"type": type(exc).__name__, "message": str(exc), "s": time.monotonic() - start}
else:
    first = {"type": None}
# The failure is remembered: a second use raises again (and does not wait again).
try:
    torch.ones(1, device="cuda")
except libremote.ConnectionFailed as exc:
    second = {"type": type(exc).__name__, "message": str(exc)}
else:
    second = {"type": None}
print(json.dumps({"first": first, "second": second}))
