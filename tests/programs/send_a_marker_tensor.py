"""Uploads a tensor whose bytes are MARKER repeated 64 times, and fetches it back.

Prints {"equal": the round trip returned the same bytes}.

Environment: LIBREMOTE_SERVER (the daemon, or a recording proxy in front of it), MARKER, and
LIBREMOTE_CLIENT_KEY/LIBREMOTE_SERVER_KEY for a CURVE daemon.
"""

import json
import os

import torch

marker = os.environ["MARKER"].encode()
x = torch.frombuffer(bytearray(marker * 64), dtype=torch.uint8)
back = (x.cuda() + 0).cpu()
print(json.dumps({"equal": torch.equal(back, x)}))
