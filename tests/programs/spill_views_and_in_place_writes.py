"""Views and in-place writes of a 4 MiB tensor, each step after pushing it out of a 16 MiB budget.

Reads views (slices, a transpose, reshapes), writes through them in place, makes a view of a
spilled storage and computes from views; every result is compared with local torch. Prints
{"problems", "spilled_before": per step, the spilled and allocated bytes, "restored_by_reading",
"spilled_after_read", "final": libremote.memory_stats()}.

Environment: LIBREMOTE_SERVER (the daemon).
"""

import json

import torch

import libremote

MiB = 1 << 20
out = {"problems": [], "spilled_before": {}}

g = torch.Generator().manual_seed(7)
base_h = torch.randint(-100, 100, (1024, 1024), generator=g).float()   # 4 MiB
base = base_h.cuda()
rows, cols, flat, col = base[100:300], base.t(), base.view(-1, 4096), base[:, 7]
top, bottom = base.view(2048, 512), base[512:]      # two views sharing the one storage

def spill_everything_but_nothing_else_held(label):
    # 6 x 4 MiB of other data (1.5x the 16 MiB budget) pushes the least recently used
    # storage, base's, to host RAM; freeing them leaves base as this session's only storage,
    # so "spilled == allocated" proves base itself is spilled right now.
    fill = [torch.full((1024, 1024), float(i), device="cuda") for i in range(6)]
    total = torch.stack([f.sum() for f in fill]).sum().item()
    assert total == sum(range(6)) * 1024 * 1024, total
    del fill
    torch.cuda.synchronize()
    stats = libremote.memory_stats()
    out["spilled_before"][label] = [stats["spilled"], stats["allocated"]]
    return stats

def check(label, remote, local):
    got = remote.cpu()
    if not torch.equal(got, local):
        out["problems"].append(f"{label}: {(got != local).sum().item()} elements differ")

spill_everything_but_nothing_else_held("read views")
before = libremote.memory_stats()["device"]["restores"]
check("rows", rows, base_h[100:300])
check("transpose", cols, base_h.t())
check("view", flat, base_h.view(-1, 4096))
check("column", col, base_h[:, 7])
out["restored_by_reading"] = libremote.memory_stats()["device"]["restores"] - before
out["spilled_after_read"] = libremote.memory_stats()["spilled"]

spill_everything_but_nothing_else_held("in-place through a slice")
rows.mul_(2); base_h[100:300].mul_(2)
check("base after rows.mul_", base, base_h)

spill_everything_but_nothing_else_held("in-place through a transpose")
cols[5].add_(1); base_h.t()[5].add_(1)
check("base after cols[5].add_", base, base_h)
check("column after cols[5].add_", col, base_h[:, 7])

spill_everything_but_nothing_else_held("setitem through a view")
flat[3, :10] = -7.0; base_h.view(-1, 4096)[3, :10] = -7.0
check("base after flat[3, :10] = -7", base, base_h)

spill_everything_but_nothing_else_held("write through one view, read through another")
top[1024:1030].fill_(3.0); base_h.view(2048, 512)[1024:1030].fill_(3.0)
check("bottom after top.fill_", bottom, base_h[512:])
spill_everything_but_nothing_else_held("read the other way")
bottom[0:2, 0:100].copy_(torch.arange(200.0).view(2, 100))
base_h[512:][0:2, 0:100].copy_(torch.arange(200.0).view(2, 100))
check("top after bottom.copy_", top, base_h.view(2048, 512))

spill_everything_but_nothing_else_held("a view made while spilled")
late = base[5:9, 100:200]                 # a new view of a spilled storage
late.zero_(); base_h[5:9, 100:200].zero_()
check("late view", late, base_h[5:9, 100:200])
check("base after late.zero_", base, base_h)
check("rows still aliases base", rows, base_h[100:300])

spill_everything_but_nothing_else_held("out-of-place from views")
mixed = (rows[:, :200] @ cols[:200, :50]) + col[100:300, None]
check("matmul of two views of one spilled storage", mixed, (base_h[100:300, :200] @ base_h.t()[:200, :50]) + base_h[100:300, 7, None])

out["final"] = libremote.memory_stats()
print(json.dumps(out), flush=True)
