"""Connects once per case of CASES, each with its own key settings; reports what happened.

CASES is a JSON object {case: {variable: value}}: before each connection LIBREMOTE_CLIENT_KEY
and LIBREMOTE_SERVER_KEY are cleared and the case's variables set. Prints {case: "connected" or
the ConnectionFailed's message}.

Environment: ADDRESS (the daemon, for libremote.connect), CASES, LIBREMOTE_TIMEOUT.
"""

import json
import os

import libremote

messages = {}
for case, variables in json.loads(os.environ["CASES"]).items():
    for name in ("LIBREMOTE_CLIENT_KEY", "LIBREMOTE_SERVER_KEY"):
        os.environ.pop(name, None)
    os.environ.update(variables)
    try:
        libremote.connect(os.environ["ADDRESS"])
        messages[case] = "connected"
    except libremote.ConnectionFailed as exc:
        messages[case] = str(exc)
print(json.dumps(messages))
