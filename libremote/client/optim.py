"""Optimizers take their multi-tensor (``foreach``) path on remote parameters.

Layer 4, the torch-facing facade.

``torch.optim`` chooses ``foreach`` only when ``type(p)`` is exactly ``torch.Tensor`` or
``Parameter`` (``torch/optim/optimizer.py: _default_to_fused_or_foreach``), and a remote
parameter's type is :class:`RemoteTensor`. Without this, every ``optimizer.step()`` runs the
per-parameter Python loop: ~10 remote ops per parameter (260 for a small GPT with AdamW) instead
of ~10 ``_foreach_*`` ops in all. Results are the same: CUDA's default is the foreach path too.
"""

from __future__ import annotations

import importlib

from .tensor import RemoteTensor

_LISTS = (importlib.import_module("torch.optim.optimizer")._foreach_supported_types,
          importlib.import_module("torch.utils._foreach_utils")._foreach_supported_types)


def register() -> None:
    for supported in _LISTS:
        if RemoteTensor not in supported:
            supported.append(RemoteTensor)
