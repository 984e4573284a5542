"""Uses every device it was given: moves one tensor through cuda:0..N-1 (daemon to daemon where
they differ), a matmul and tanh on each, against the same on local CPU.

Prints {"count": torch.cuda.device_count(), "equal": whether the result matched local torch,
"addresses": the daemon of each cuda:N, "sessions": sessions open}.

Environment: LIBREMOTE_SERVER (a pool), LIBREMOTE_DEVICES, LIBREMOTE_PLACEMENT.
"""

import json

import torch

from libremote.client import runtime

count = torch.cuda.device_count()
torch.manual_seed(0)
host = torch.randn(32, 32)
x, expected = host.to("cuda:0"), host
for index in range(count):
    x = (x.to(f"cuda:{index}") @ x.to(f"cuda:{index}").T).tanh()
    expected = (expected @ expected.T).tanh()
print(json.dumps({"count": count, "equal": torch.equal(x.cpu(), expected),
                  "addresses": [runtime.session_for(i).address for i in range(count)],
                  "sessions": len(runtime.sessions())}))
