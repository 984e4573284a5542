"""Holds a placement of two devices until told to go: writes DIR/NAME.held (JSON: the daemons of
cuda:0 and cuda:1) once it holds a tensor on cuda:0, waits for DIR/NAME.go, then copies the
tensor to cuda:1 and checks the result.

Prints {"equal": whether (the tensor on cuda:1) * 2 matched local torch}.

Environment: LIBREMOTE_SERVER (a pool), LIBREMOTE_DEVICES, LIBREMOTE_TENANT, DIR, NAME.
"""

import json
import os
import time
from pathlib import Path

import torch

from libremote.client import runtime

folder, name = Path(os.environ["DIR"]), os.environ["NAME"]
a = torch.arange(8.0, device="cuda:0")
(folder / f"{name}.held").write_text(json.dumps([runtime.session_for(i).address for i in range(2)]))
while not (folder / f"{name}.go").exists():
    time.sleep(0.05)
print(json.dumps({"equal": torch.equal((a.to("cuda:1") * 2).cpu(), torch.arange(8.0) * 2)}))
