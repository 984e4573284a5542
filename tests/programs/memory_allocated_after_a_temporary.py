"""Reads torch.cuda.memory_allocated() before and after a line whose result is a dropped temporary.

Prints {"before", "after", "total"}.

Environment: LIBREMOTE_SERVER (the daemon).
"""

import json

import torch

x = torch.ones(1 << 20, device="cuda")  # 4 MiB
torch.cuda.synchronize()
before = torch.cuda.memory_allocated()
total = x.sum().item()  # the 4-byte result is a temporary, dropped on this line
after = torch.cuda.memory_allocated()
print(json.dumps({"before": before, "after": after, "total": total}))
