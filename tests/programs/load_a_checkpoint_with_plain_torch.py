"""Loads a tensor file and a state-dict file with plain torch (libremote is never imported),
map_location='cpu'.

Prints {"type", "device", "tensor": the tensor's values, "state": {key: [dtype, values]}}.

Arguments: TENSOR_FILE STATE_FILE.
"""

import json
import sys

import torch

assert 'libremote' not in sys.modules
t = torch.load(sys.argv[1], map_location='cpu')
s = torch.load(sys.argv[2], map_location='cpu')
assert 'libremote' not in sys.modules
print(json.dumps({'type': type(t).__name__, 'device': str(t.device), 'tensor': t.tolist(),
    'state': {k: [str(v.dtype), v.tolist()] for k, v in s.items()}}))
