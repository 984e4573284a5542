"""Uses cuda with no daemon address configured and reports the error and the warning.

Prints {"type", "message", "available": torch.cuda.is_available(), "warnings"}.

Environment: none (LIBREMOTE_SERVER unset).
"""

import json
import warnings

import torch

import libremote

out = {}
try:
    torch.ones(1).cuda()
except libremote.LibremoteError as exc:
    out["type"] = type(exc).__name__
    out["message"] = str(exc)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out["available"] = torch.cuda.is_available()
out["warnings"] = [str(w.message) for w in caught]
print(json.dumps(out))
