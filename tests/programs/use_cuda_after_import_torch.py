"""An unmodified program: imports torch (not libremote) and uses cuda; LIBREMOTE_SERVER alone
opts it in, through the startup hook.

Prints whether libremote got imported, torch.cuda.is_available() and device_count(), and a
tensor's device and a sum computed on it, one line each.

Environment: LIBREMOTE_SERVER (the daemon).
"""

import sys

import torch

print('libremote' in sys.modules)
print(torch.cuda.is_available(), torch.cuda.device_count())
x = torch.arange(4.0, device='cuda')
print(x.device, (x * 2).sum().item())
