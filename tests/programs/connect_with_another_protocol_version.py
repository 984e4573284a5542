"""Connects claiming protocol version 77, which the daemon refuses; prints {"message": the
ConnectionFailed's message}.

Environment: ADDRESS (the daemon, for libremote.connect).
"""

import json, os, libremote
from libremote_wire import codec, messages, torch_codec
messages.PROTOCOL_VERSION = 77
try:
    libremote.connect(os.environ["ADDRESS"])
except libremote.ConnectionFailed as exc:
    print(json.dumps({"message": str(exc)}))
