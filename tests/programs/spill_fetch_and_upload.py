"""Fetches and uploads into a 4 MiB tensor (not integers: the bytes must round-trip) each time
after pushing it out of the budget: whole, strided views, slices, a transpose, float64
conversion and broadcasting.

Prints {"problems": the checks that differ from local torch, "spilled": per step, the spilled
and allocated bytes before it, "final": libremote.memory_stats()}.

Environment: LIBREMOTE_SERVER (the daemon).
"""

import json

import torch

import libremote

MiB = 1 << 20
out = {"problems": [], "spilled": {}}
g = torch.Generator().manual_seed(3)
x_h = torch.randn(1024, 1024, generator=g)           # 4 MiB, not integers: bytes must round-trip
x = x_h.cuda()

def spill(label):
    fill = [torch.full((1024, 1024), float(i), device="cuda") for i in range(6)]
    assert torch.stack([f.sum() for f in fill]).sum().item() == 15 * 1024 * 1024
    del fill
    torch.cuda.synchronize()
    stats = libremote.memory_stats()
    out["spilled"][label] = [stats["spilled"], stats["allocated"]]

def check(label, remote, local):
    got = remote.cpu()
    if got.dtype != local.dtype or not torch.equal(got, local):
        out["problems"].append(label)

spill("fetch")
check("fetch of a spilled tensor", x, x_h)
spill("fetch of a view")
check("fetch of a strided view of a spilled tensor", x[::3, 5::7], x_h[::3, 5::7])

spill("upload whole")
new = torch.randn(1024, 1024, generator=g)
x.copy_(new); x_h.copy_(new)
spill("read after upload whole")
check("after copy_ of a whole spilled tensor", x, x_h)

spill("upload into a slice")
patch = torch.randn(100, 1024, generator=g)
x[200:300].copy_(patch); x_h[200:300].copy_(patch)
check("after copy_ into a slice", x, x_h)

spill("upload into a transpose")
patch = torch.randn(1024, 16, generator=g)
x.t()[:, 40:56].copy_(patch); x_h.t()[:, 40:56].copy_(patch)
check("after copy_ into a transposed view", x, x_h)

spill("upload with conversion")
ints = torch.arange(1024 * 1024, dtype=torch.float64).view(1024, 1024) / 7
x.copy_(ints); x_h.copy_(ints)
spill("read after conversion")
check("after copy_ from float64", x, x_h)

spill("upload broadcast")
row = torch.randn(1024, generator=g)
x.copy_(row); x_h.copy_(row)
check("after broadcasting copy_", x, x_h)
out["final"] = libremote.memory_stats()
print(json.dumps(out), flush=True)
