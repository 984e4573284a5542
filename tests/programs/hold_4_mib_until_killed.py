"""Holds 4 MiB on the daemon, writes the file READY, and sleeps (up to 10 minutes) until the test
kills or stops it.

Environment: LIBREMOTE_SERVER (the daemon), READY.
"""

import os

import torch

x = torch.empty(4 << 20, dtype=torch.uint8, device="cuda")
torch.cuda.synchronize()
open(os.environ["READY"], "w").close()
import time; time.sleep(600)
