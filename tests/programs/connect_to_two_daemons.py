"""Connects with libremote.connect to the daemons its argument names, computes on cuda:1 and
moves the result to cuda:0.

Prints {"count": torch.cuda.device_count(), "value": the result}.

Environment: LIBREMOTE_DEVICES (no LIBREMOTE_SERVER). Argument: the addresses, as
libremote.connect takes them ("tcp://a, tcp://b").
"""

import json
import sys

import torch

import libremote

libremote.connect(sys.argv[1])
x = torch.ones(2, device="cuda:1") * 3
print(json.dumps({"count": torch.cuda.device_count(), "value": x.to("cuda:0").cpu().tolist()}))
