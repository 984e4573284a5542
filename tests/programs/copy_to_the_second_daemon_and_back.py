"""Copies a 12 MiB tensor (more than one PULL piece) from cuda:0 to cuda:1, which are on two
daemons, and twice it back to cuda:0.

Prints {"exact": whether both copies matched local torch bit for bit, "devices": the copies'
devices}.

Environment: LIBREMOTE_SERVER (two daemons: tcp://a,tcp://b), LIBREMOTE_CLIENT_KEY and
LIBREMOTE_SERVER_KEY (for CURVE daemons).
"""

import json

import torch

torch.manual_seed(0)
host = torch.randn(3 << 20)  # 12 MiB: more than one PULL piece
a = host.to("cuda:0")
b = a.to("cuda:1")
c = (b * 2).to("cuda:0")  # and back
print(json.dumps({"exact": torch.equal(b.cpu(), host) and torch.equal(c.cpu(), host * 2),
                  "devices": [str(b.device), str(c.device)]}))
