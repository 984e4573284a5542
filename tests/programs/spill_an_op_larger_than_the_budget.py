"""An add of two 4 MiB tensors under an 8 MiB budget: the op needs 12 MiB resident at once.

Prints {"exact", "sum_close", "spilled"}.

Environment: LIBREMOTE_SERVER (the daemon).
"""

import json

import torch

import libremote

a_h, b_h = torch.randn(1024, 1024), torch.randn(1024, 1024)   # 4 MiB each, budget 8 MiB
a, b = a_h.cuda(), b_h.cuda()
c = a + b                                                     # 12 MiB at once
d = (c * a).sum()
print(json.dumps({"exact": torch.equal(c.cpu(), a_h + b_h), "sum_close": abs(d.item() - ((a_h + b_h) * a_h).sum().item()) < 1e-2,
                  "spilled": libremote.memory_stats()["spilled"]}))
