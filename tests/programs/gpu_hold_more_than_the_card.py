"""On a GPU daemon: holds 2 GiB blocks until they add up to 8 GiB more than the card's memory, then
checks every block's values.

Prints {"count", "intact": per block, its values survived, "device":
libremote.memory_stats()["device"]}.

Environment: TEST_SERVER (the daemon, for libremote.connect).
"""

import json
import os

import torch

import libremote

libremote.connect(os.environ["TEST_SERVER"])
total = torch.cuda.get_device_properties(0).total_memory
block = 2 << 30
count = total // block + 4  # 8 GiB more than the card holds
held = [torch.full((block // 4,), float(i), device="cuda") for i in range(count)]
intact = [bool((t == i).all().item()) for i, t in enumerate(held)]
print(json.dumps({"count": count, "intact": intact, "device": libremote.memory_stats()["device"]}))
