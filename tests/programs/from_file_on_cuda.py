"""Asks for torch.from_file(FILE, device="cuda"), which the daemon refuses, then computes.

Prints {"kind": the refusal's kind, "message", "after": a sum computed afterwards}.

Environment: LIBREMOTE_SERVER (the daemon), FILE.
"""

import json
import os

import torch

import libremote

out = {}
try:
    torch.from_file(os.environ["FILE"], size=4, device="cuda").cpu()
except libremote.RemoteOpError as exc:
    out = {"kind": exc.kind, "message": str(exc)}
out["after"] = torch.ones(2, device="cuda").sum().item()
print(json.dumps(out))
