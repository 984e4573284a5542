"""Uploads and fetches tensors around the stripe threshold and far above it, and computes on them.

Prints {"exact": [name, ...] of those that came back bit-exact, "all": every name,
"stripes": stripes open, "striped_sent": bytes, "striped_received": bytes}.

Environment: LIBREMOTE_SERVER (a CURVE daemon), LIBREMOTE_CLIENT_KEY, LIBREMOTE_SERVER_KEY,
LIBREMOTE_STRIPES.
"""

import json

import torch

import libremote
from libremote.client import runtime
from libremote_wire import messages

g = torch.Generator().manual_seed(11)
chunk = messages.STRIPE_CHUNK_BYTES
cases = {
    "below the threshold": torch.randn(messages.STRIPE_MIN_BYTES // 4 - 1, generator=g),
    "exactly the threshold": torch.randn(messages.STRIPE_MIN_BYTES // 4, generator=g),
    "an odd byte count": torch.randint(0, 255, (3 * chunk + 7,), dtype=torch.uint8, generator=g),
    "20 MiB in upload pieces": torch.randn(5 << 20, generator=g),
    "a 2-d float64 matrix": torch.randn(1031, 517, dtype=torch.float64, generator=g),
}
# A fetch before any upload: the first striped frame of the session comes from the worker.
first = torch.arange(1 << 20, dtype=torch.float32, device="cuda").cpu()
exact = ["a fetch before any upload"] if torch.equal(first, torch.arange(1 << 20, dtype=torch.float32)) else []
for name, host in cases.items():
    remote = host.cuda()
    back = remote.cpu()
    doubled = (remote * 2).cpu()  # an op on the striped upload, then a striped fetch of its result
    if torch.equal(back, host) and torch.equal(doubled, host * 2):
        exact.append(name)
libremote.synchronize()
count, sent, received = runtime.sessions()[0].connection.striped_bytes()
print(json.dumps({"exact": exact, "all": ["a fetch before any upload", *cases], "stripes": count, "striped_sent": sent,
                  "striped_received": received}))
