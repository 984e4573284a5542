"""Goes over its memory quota by allocating and by uploading, and goes on after each refusal.

Holds 48 MiB and asks for 32 MiB more (the error comes at the next sync point, as on CUDA),
frees, allocates again, then uploads 80 MiB. Prints a JSON report of what was raised where and
of torch.cuda.memory_allocated() after each step.

Environment: LIBREMOTE_SERVER (the daemon).
"""

import json

import torch

import libremote

out = {}
a = torch.empty(48 << 20, dtype=torch.uint8, device="cuda")
torch.cuda.synchronize()
out["after_a"] = torch.cuda.memory_allocated()

try:
    b = torch.empty(32 << 20, dtype=torch.uint8, device="cuda")
    out["alloc_line_raised"] = False
except Exception as exc:
    out["alloc_line_raised"] = type(exc).__name__
try:
    torch.cuda.synchronize()
    out["sync_raised"] = None
except torch.cuda.OutOfMemoryError as exc:
    out["sync_raised"] = type(exc).__name__
    out["is_remote_oom"] = isinstance(exc, libremote.RemoteOutOfMemoryError)
    out["is_torch_oom"] = isinstance(exc, torch.OutOfMemoryError)
    out["message"] = str(exc)
out["after_failure"] = torch.cuda.memory_allocated()

del a
c = torch.empty(32 << 20, dtype=torch.uint8, device="cuda")
c.fill_(1)
out["c_sum"] = c.sum().item()
out["after_c"] = torch.cuda.memory_allocated()

host = torch.empty(80 << 20, dtype=torch.uint8)
try:
    d = host.cuda()
    torch.cuda.synchronize()
    out["upload"] = None
except torch.cuda.OutOfMemoryError as exc:
    out["upload"] = str(exc)
out["after_upload"] = torch.cuda.memory_allocated()
out["c_sum_again"] = c.sum().item()
print(json.dumps(out), flush=True)
