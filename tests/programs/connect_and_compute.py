"""Connects with libremote.connect and computes a small sum; prints {"sum": ...}.

Environment: ADDRESS (the daemon).
"""

import json
import os

import torch

import libremote

libremote.connect(os.environ["ADDRESS"])
x = torch.arange(6.0).reshape(2, 3)
print(json.dumps({"sum": (x.cuda() * 2).sum().item()}))
