"""Ops the client sends that the daemon's device has no kernel for, implemented with ones it has.

``scaled_dot_product_attention`` on the client's ``remote`` device picks the *overrideable* fused
backend (PrivateUse1's hook for backends with their own attention kernel), so attention travels as
one op, forward and backward, instead of ~17 decomposed ones. Here it maps to the device's fused
kernels: memory-efficient attention on CUDA, flash attention on the CPU. Where a fused kernel
cannot take the inputs, the math implementation runs instead and the backward recomputes through
autograd; an empty logsumexp marks that case for the backward.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

aten = torch.ops.aten


def _math_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_bias: Any,
                    dropout_p: float, is_causal: bool, scale: Any) -> torch.Tensor:
    return aten._scaled_dot_product_attention_math(
        query, key, value, attn_bias, dropout_p, is_causal, None, scale=scale
    )[0]


def attention_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_bias: Any = None,
                      dropout_p: float = 0.0, is_causal: bool = False, return_debug_mask: bool = False,
                      *, scale: Any = None) -> tuple[Any, ...]:
    """``aten::_scaled_dot_product_fused_attention_overrideable``."""
    max_q, max_k = query.shape[-2], key.shape[-2]
    no_rng = torch.empty((), dtype=torch.int64, device=query.device)
    if query.device.type == "cuda":
        try:
            out, lse, seed, offset = aten._scaled_dot_product_efficient_attention(
                query, key, value, attn_bias, True, dropout_p, is_causal, scale=scale
            )
            return out, lse, None, None, max_q, max_k, seed, offset, None
        except RuntimeError:
            pass
    elif query.device.type == "cpu" and dropout_p == 0.0:
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=attn_bias, scale=scale
        )
        return out, lse, None, None, max_q, max_k, no_rng, no_rng.clone(), None
    out = _math_attention(query, key, value, attn_bias, dropout_p, is_causal, scale)
    empty_lse = torch.empty((0,), dtype=torch.float32, device=query.device)
    return out, empty_lse, None, None, max_q, max_k, no_rng, no_rng.clone(), None


def attention_backward(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attn_bias: Any, grad_input_mask: list[bool], out: torch.Tensor, logsumexp: torch.Tensor,
                       cum_seq_q: Any, cum_seq_k: Any, max_q: int, max_k: int, dropout_p: float, is_causal: bool,
                       philox_seed: torch.Tensor, philox_offset: torch.Tensor, *, scale: Any = None) -> tuple[Any, ...]:
    """``aten::_scaled_dot_product_fused_attention_overrideable_backward``."""
    if logsumexp.numel():
        if query.device.type == "cuda":
            grads = aten._scaled_dot_product_efficient_attention_backward(
                grad_out, query, key, value, attn_bias, out, logsumexp, philox_seed, philox_offset,
                dropout_p, grad_input_mask, is_causal, scale=scale,
            )
            return tuple(grads[i] if grad_input_mask[i] else None for i in range(4))
        if query.device.type == "cpu" and not grad_input_mask[3]:
            gq, gk, gv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, attn_mask=attn_bias, scale=scale
            )
            return gq, gk, gv, None
    # Recompute through autograd (math attention; also the only way to a bias gradient on CPU).
    inputs = [t.detach().requires_grad_(need) if t is not None else None
              for t, need in zip((query, key, value, attn_bias), grad_input_mask)]
    with torch.enable_grad():
        result = _math_attention(inputs[0], inputs[1], inputs[2], inputs[3], dropout_p, is_causal, scale)
        wanted = [t for t, need in zip(inputs, grad_input_mask) if need and t is not None]
        grads = iter(torch.autograd.grad(result, wanted, grad_out))
    return tuple(next(grads) if need and t is not None else None for t, need in zip(inputs, grad_input_mask))


#: op schema name -> implementation on the daemon's devices
TRANSLATIONS: dict[str, Callable[..., Any]] = {
    "aten::_scaled_dot_product_fused_attention_overrideable": attention_forward,
    "aten::_scaled_dot_product_fused_attention_overrideable_backward": attention_backward,
}
