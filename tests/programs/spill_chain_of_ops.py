"""A working set of 64 MiB (16 tensors of 4 MiB), 4x a 16 MiB budget, through rounds of
elementwise ops, in-place writes, matmuls and reductions, compared with local torch.

Values stay small integers, so every result is exact whatever the summation order. Prints
{"problems", "resident_samples", "after_upload", "final", "virtual_total",
"torch_cuda_allocated"}.

Environment: LIBREMOTE_SERVER (the daemon).
"""

import json

import torch

import libremote

MiB = 1 << 20
BUDGET = 16 * MiB
N = 16                                   # 16 tensors of 4 MiB: 64 MiB, 4x the budget

g = torch.Generator().manual_seed(1234)
host = [torch.randint(-8, 9, (1024, 1024), generator=g).float() for _ in range(N)]
out = {"problems": [], "resident_samples": []}

def sample(where):
    stats = libremote.memory_stats()
    out["resident_samples"].append([where, stats["resident"], stats["device"]["resident_bytes"]])
    return stats

def chain(ts, device):
    # Small integers throughout (|x| <= 8): every matmul entry and every sum is an exact
    # float32 integer, whatever order the kernel adds in.
    ts = list(ts)
    results = []
    for r in range(3):
        for i in range(N):                                   # elementwise, fresh tensors
            ts[i] = torch.remainder(ts[i] * 3 + ts[(i + 5) % N], 17) - 8
        for i in range(0, N, 2):                             # in place
            ts[i].mul_(-1).add_(ts[i + 1]).remainder_(17).sub_(8)
        for i in range(0, N, 4):                             # matmul between pairs
            p = ts[i] @ ts[(i + 3) % N]
            results.append(("mm", r, i, p.cpu()))
            ts[i + 1].add_(torch.remainder(p, 17)).remainder_(17).sub_(8)
        sums = torch.stack([t.sum() for t in ts])            # reductions over all of them
        results.append(("sums", r, -1, sums.cpu()))
        results.append(("amax", r, -1, torch.stack([t.amax(dim=1) for t in ts[::3]]).cpu()))
        results.append(("count", r, -1, torch.stack([(t > 0).sum() for t in ts[1::3]]).cpu()))
        if device != "cpu":
            sample(f"round {r}")
    return ts, results

local_ts, local_results = chain([h.clone() for h in host], "cpu")

dev = [h.cuda() for h in host]           # uploads: 64 MiB from the host
torch.cuda.synchronize()
after_upload = sample("after upload")
out["after_upload"] = {k: after_upload[k] for k in ("allocated", "resident", "spilled")}

remote_ts, remote_results = chain(dev, "cuda")
for (name, r, i, expected), (_, _, _, got) in zip(local_results, remote_results):
    if not torch.equal(expected, got):
        out["problems"].append(f"{name} round {r} index {i} differs")
for i, (expected, got) in enumerate(zip(local_ts, remote_ts)):
    if not torch.equal(expected, got.cpu()):
        out["problems"].append(f"tensor {i} differs after the chain")
# Re-read every original upload too: the uploads survived being spilled.
for i, (h, d) in enumerate(zip(host, dev)):
    if not torch.equal(h, d.cpu()):
        out["problems"].append(f"upload {i} differs")
del dev, d                               # (d: the loop's last upload)
torch.cuda.synchronize()
stats = sample("end")
out["final"] = stats
out["virtual_total"] = sum(t.numel() * t.element_size() for t in remote_ts)
out["torch_cuda_allocated"] = torch.cuda.memory_allocated()
print(json.dumps(out), flush=True)
