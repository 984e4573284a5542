"""Holds 24 MiB and asks for 16 MiB more; prints {"raised": the out-of-memory message or None}.

Environment: LIBREMOTE_SERVER (the daemon), LIBREMOTE_TENANT and LIBREMOTE_TOKEN.
"""

import json

import torch

a = torch.empty(24 << 20, dtype=torch.uint8, device="cuda")
try:
    b = torch.empty(16 << 20, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    print(json.dumps({"raised": None}))
except torch.cuda.OutOfMemoryError as exc:
    print(json.dumps({"raised": str(exc)}))
