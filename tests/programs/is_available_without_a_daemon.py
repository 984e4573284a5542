"""Asks torch.cuda.is_available() and device_count() when the daemon does not answer.

Prints {"available", "count", "warnings"}.

Environment: LIBREMOTE_SERVER (an address nobody listens on), LIBREMOTE_TIMEOUT.
"""

import json
import warnings

import torch

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    available = torch.cuda.is_available()
    count = torch.cuda.device_count()
print(json.dumps({"available": available, "count": count,
                  "warnings": [str(w.message) for w in caught]}))
