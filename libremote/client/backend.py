"""The remote device's name in torch: ``remote:N``, the renamed PrivateUse1 backend.

Layer 2, remote tensors: the name and device objects every layer uses. Registering the backend
with torch (its kernels, its backend module) is the facade's: :mod:`.registration`.
"""

from __future__ import annotations

import torch

BACKEND_NAME = "remote"

_DEVICES: dict[int, torch.device] = {}


def device(index: int = 0) -> torch.device:
    dev = _DEVICES.get(index)
    if dev is None:
        dev = _DEVICES[index] = torch.device(BACKEND_NAME, index)
    return dev
