"""Replays a captured step (x * 2 + w) over five inputs, pushing its tensors out of an 8 MiB budget
between replays with another 4 MiB tensor.

Prints {"results": each replay equal to local torch, "spilled": whether anything was spilled
after each, "restores"}.

Environment: LIBREMOTE_SERVER (the daemon).
"""

import json

import torch

import libremote

torch.manual_seed(0)
w = torch.randint(-8, 9, (1024, 1024)).float()                     # 4 MiB, budget 8 MiB
xs = [torch.randint(-8, 9, (1024, 1024)).float() for _ in range(5)]
wd = w.cuda()
step = libremote.capture_step(lambda x: x * 2 + wd, xs[0].cuda())
out, results, spilled = None, [], []
for x in xs:
    out = step(x.cuda())
    results.append(torch.equal(out.cpu(), x * 2 + w))
    filler = torch.ones(1024, 1024, device="cuda") * 3             # pushes the step's tensors out
    spilled.append(libremote.memory_stats()["spilled"] > 0)
    del filler
print(json.dumps({"results": results, "spilled": spilled,
                  "restores": libremote.memory_stats()["device"]["restores"]}))
