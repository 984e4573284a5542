"""Connects claiming protocol version 77, which the daemon refuses; prints {"message": the
ConnectionFailed's message}.

Environment: ADDRESS (the daemon, for libremote.connect).
"""

import json
import os

import libremote
from libremote_wire import messages

messages.PROTOCOL_VERSION = 77
try:
    libremote.connect(os.environ["ADDRESS"])
except libremote.ConnectionFailed as exc:
    print(json.dumps({"message": str(exc)}))
