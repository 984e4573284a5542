"""Tries ops that mix a tensor on cuda:0 with one on cuda:1 (two daemons), then disconnects
(closing both daemons' sessions), connects again and uses a tensor of the earlier sessions.

Prints {"add", "matmul", "cat", "add_", "where": [the exception's type, its message] (null if
the op worked), "a_still_works", "all_closed", "reopened": [sessions, device count, a sum computed
across the new sessions], "old_tensor": the error using the old tensor (null if it worked)}.

Environment: LIBREMOTE_SERVER (two daemons: tcp://a,tcp://b).
"""

import json

import torch

import libremote
from libremote.client import runtime

a, b = torch.ones(3, device="cuda:0"), torch.ones(3, device="cuda:1")
errors = {}
for name, call in {"add": lambda: a + b, "matmul": lambda: a @ b, "cat": lambda: torch.cat([a, b]),
                   "add_": lambda: a.add_(b), "where": lambda: torch.where(a > 0, a, b)}.items():
    try:
        call()
        errors[name] = None
    except Exception as exc:
        errors[name] = [type(exc).__name__, str(exc)]
errors["a_still_works"] = (a * 2).sum().item() == 6.0
# closing closes every daemon's session; connecting again opens both
opened = runtime.sessions()
libremote.disconnect()
errors["all_closed"] = len(opened) == 2 and all(session.closed for session in opened) and runtime.sessions() == []
libremote.connect()
errors["reopened"] = [len(runtime.sessions()), torch.cuda.device_count(),
                      (torch.ones(2, device="cuda:1").to("cuda:0") * 2).sum().item()]
try:
    b + 1
    errors["old_tensor"] = None
except RuntimeError as exc:
    errors["old_tensor"] = str(exc)
print(json.dumps(errors))
