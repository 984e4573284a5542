"""Fused attention as one remote op.

Layer 4, the torch-facing facade: a case of the device mode (:mod:`.device_map`).

``F.scaled_dot_product_attention`` picks its kernel through a C++ dispatch stub that a Python
backend cannot register for, so on the ``remote`` device it would decompose into ~17 ops (and as
many again in backward). Instead, the torch-function mode routes the call here, and we call
``aten::_scaled_dot_product_fused_attention_overrideable`` directly: PyTorch's hook for backends
with their own attention kernel, which has an autograd formula, so the backward is one op too.
The daemon maps both to its device's fused kernel (``libremote_server.translations``).

Dropout inside attention and grouped-query attention keep torch's own (decomposed) path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .tensor import RemoteTensor

_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
_DEFAULTS = (None, None, None, None, 0.0, False)

#: Set by graph mode (:mod:`.compile`) while it traces on ``meta`` stand-ins: the graph will run
#: on the daemon, so attention goes into it as the one fused op, as it would run eagerly.
tracing_graph = False


def _on_daemon(tensor: Any) -> bool:
    if isinstance(tensor, RemoteTensor):
        return True
    return tracing_graph and isinstance(tensor, torch.Tensor) and tensor.device.type == "meta"


def scaled_dot_product_attention(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    bound = dict(zip(_NAMES, _DEFAULTS))
    bound.update(zip(_NAMES, args))
    bound.update((k, v) for k, v in kwargs.items() if k in _NAMES)
    query, key, value, mask = bound["query"], bound["key"], bound["value"], bound["attn_mask"]
    fused = (
        _on_daemon(query) and _on_daemon(key) and _on_daemon(value)
        and query.dim() == 4 and key.dim() == 4 and value.dim() == 4
        and query.is_floating_point()
        and not bound["dropout_p"]
        and not kwargs.get("enable_gqa", False)
        and query.shape[1] == key.shape[1] == value.shape[1]
        and (mask is None or (_on_daemon(mask) and not bound["is_causal"]))
    )
    if not fused:
        return func(*args, **kwargs)
    if mask is not None and mask.dtype == torch.bool:
        # As torch does before its fused kernels: a boolean mask becomes an additive bias.
        mask = query.new_zeros(mask.shape).masked_fill_(~mask, float("-inf"))
    outputs = torch.ops.aten._scaled_dot_product_fused_attention_overrideable(
        query, key, value, mask, 0.0, bool(bound["is_causal"]), False, scale=kwargs.get("scale")
    )
    return outputs[0]


HOOKS: dict[Any, Callable[..., Any]] = {
    torch.nn.functional.scaled_dot_product_attention: scaled_dot_product_attention,
}

_original = torch.nn.functional.scaled_dot_product_attention


def _patched(*args: Any, **kwargs: Any) -> Any:
    """``torch.nn.functional``'s own global (see :mod:`.patches`): ``multi_head_attention_forward``
    (every ``nn.MultiheadAttention``/``nn.Transformer*``) calls it from inside its own
    ``__torch_function__`` handling, where the torch-function mode is switched off."""
    return scaled_dot_product_attention(_original, args, kwargs)
