"""Ops the client sends that the daemon's device has no kernel for, implemented with ones it has.

The client decomposes ops as a GPU backend would, so some ops it sends have kernels on CUDA only:
the fused LSTM/GRU cells that ``nn.LSTM``/``nn.GRU`` use on an accelerator. On other devices they
are computed here from ordinary ops, with the same workspace layout as CUDA's kernels (activated
gates, so the backward needs no recomputation).

``scaled_dot_product_attention`` on the client's ``remote`` device picks the *overrideable* fused
backend (PrivateUse1's hook for backends with their own attention kernel), so attention travels as
one op, forward and backward, instead of ~17 decomposed ones. Here it maps to the device's fused
kernels: memory-efficient attention on CUDA, flash attention on the CPU. Where a fused kernel
cannot take the inputs, the math implementation runs instead and the backward recomputes through
autograd; an empty logsumexp marks that case for the backward.

A few CPU kernels lay their results out unlike CUDA's (and unlike the meta kernels the client
infers layouts with): on the CPU their results are copied into CUDA's layout
(:func:`_contiguous_as_on_cuda`, :func:`native_batch_norm`), so that the client's metadata is
the daemon tensor's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch

aten = torch.ops.aten


def _math_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_bias: Any,
                    dropout_p: float, is_causal: bool, scale: Any) -> torch.Tensor:
    out: torch.Tensor = aten._scaled_dot_product_attention_math(  # (torch.ops' overloads are untyped)
        query, key, value, attn_bias, dropout_p, is_causal, None, scale=scale
    )[0]
    return out


def _like(result: Any, reference: torch.Tensor) -> Any:
    """``result`` laid out as torch's meta kernels promise, the same dimension order as
    ``reference`` (``alloc_with_matching_layout``/``empty_like``); the device kernels pick their
    own. The client infers strides from those meta kernels, and graphs reshape with ``view`` on
    the strength of them, so what the daemon stores must match."""
    if not isinstance(result, torch.Tensor) or result.stride() == reference.stride() or result.dim() != reference.dim():
        return result
    def outermost_first(d: int) -> tuple[int, int]:
        return -reference.stride(d), d

    order = sorted(range(reference.dim()), key=outermost_first)
    target = torch.empty([result.shape[d] for d in order], dtype=result.dtype, device=result.device)
    target = target.permute([order.index(d) for d in range(reference.dim())])
    return target.copy_(result) if target.stride() != result.stride() else result


def attention_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_bias: Any = None,
                      dropout_p: float = 0.0, is_causal: bool = False, return_debug_mask: bool = False,
                      *, scale: Any = None) -> tuple[Any, ...]:
    """``aten::_scaled_dot_product_fused_attention_overrideable``."""
    max_q, max_k = query.shape[-2], key.shape[-2]
    no_rng = torch.zeros((), dtype=torch.int64, device=query.device)  # handed out: never uninitialised
    if query.device.type == "cuda":
        try:
            out, lse, seed, offset = aten._scaled_dot_product_efficient_attention(
                query, key, value, attn_bias, True, dropout_p, is_causal, scale=scale
            )
            # The kernel hands its dropout seed and offset back as host scalars (device ones
            # under a graph capture with dropout); the session stores results on its device
            # only. Without dropout they are never read: device zeros, no copy (a host-to-device
            # copy would fail inside a CUDA-graph capture).
            if dropout_p == 0.0:
                seed, offset = no_rng, no_rng.clone()
            else:
                seed, offset = seed.to(query.device), offset.to(query.device)
            if lse.shape[-1] > max_q:
                # The kernel pads its logsumexp's rows to a multiple of 32 and writes only the
                # real ones: the padding would hand the client's handle bytes nobody wrote.
                lse[..., max_q:].zero_()
            return _like(out, query), lse, None, None, max_q, max_k, seed, offset, None
        except RuntimeError:
            pass
    elif query.device.type == "cpu" and dropout_p == 0.0:
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=attn_bias, scale=scale
        )
        # The CPU kernel's logsumexp is a transposed view, (B, L, H) memory; the client was
        # promised (B, H, L) contiguous (the op's meta kernel), and the CPU backward reads it by
        # its strides either way (bit-identical gradients).
        return _like(out, query), lse.contiguous(), None, None, max_q, max_k, no_rng, no_rng.clone(), None
    out = _math_attention(query, key, value, attn_bias, dropout_p, is_causal, scale)
    empty_lse = torch.empty((0,), dtype=torch.float32, device=query.device)
    return _like(out, query), empty_lse, None, None, max_q, max_k, no_rng, no_rng.clone(), None


def attention_backward(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attn_bias: Any, grad_input_mask: list[bool], out: torch.Tensor, logsumexp: torch.Tensor,
                       cum_seq_q: Any, cum_seq_k: Any, max_q: int, max_k: int, dropout_p: float, is_causal: bool,
                       philox_seed: torch.Tensor, philox_offset: torch.Tensor, *, scale: Any = None) -> tuple[Any, ...]:
    """``aten::_scaled_dot_product_fused_attention_overrideable_backward``."""
    if logsumexp.numel():
        if query.device.type == "cuda":
            if dropout_p > 0 and philox_seed.is_cuda and not torch.cuda.is_current_stream_capturing():
                # The kernel reads a host seed and offset outside a capture (and only with dropout).
                philox_seed, philox_offset = philox_seed.cpu(), philox_offset.cpu()
            grads = aten._scaled_dot_product_efficient_attention_backward(
                grad_out, query, key, value, attn_bias, out, logsumexp, philox_seed, philox_offset,
                dropout_p, grad_input_mask, is_causal, scale=scale,
            )
            return tuple(_like(grads[i], ref) if grad_input_mask[i] else None
                         for i, ref in enumerate((query, key, value, attn_bias)))
        if query.device.type == "cpu" and not grad_input_mask[3]:
            gq, gk, gv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, attn_mask=attn_bias, scale=scale
            )
            return _like(gq, query), _like(gk, key), _like(gv, value), None
    # Recompute through autograd (math attention; also the only way to a bias gradient on CPU).
    inputs = [t.detach().requires_grad_(need) if t is not None else None
              for t, need in zip((query, key, value, attn_bias), grad_input_mask)]
    with torch.enable_grad():
        # (inputs[0:3] are tensors, as query, key and value are; only the bias may be None.)
        result = _math_attention(cast(torch.Tensor, inputs[0]), cast(torch.Tensor, inputs[1]),
                                 cast(torch.Tensor, inputs[2]), inputs[3], dropout_p, is_causal, scale)
        wanted = [t for t, need in zip(inputs, grad_input_mask) if need and t is not None]
        grads = iter(torch.autograd.grad(result, wanted, grad_out))
    return tuple(_like(next(grads), t) if need and t is not None else None for t, need in zip(inputs, grad_input_mask))


def lstm_cell(input_gates: torch.Tensor, hidden_gates: torch.Tensor, cx: torch.Tensor,
              input_bias: Any = None, hidden_bias: Any = None) -> tuple[torch.Tensor, ...]:
    """``aten::_thnn_fused_lstm_cell``: (hy, cy, workspace = activated gates i|f|g|o)."""
    if input_gates.device.type == "cuda":
        fused: tuple[torch.Tensor, ...] = aten._thnn_fused_lstm_cell(input_gates, hidden_gates, cx, input_bias, hidden_bias)
        return fused
    gates = input_gates + hidden_gates
    if input_bias is not None:
        gates = gates + input_bias + hidden_bias
    i, f, g, o = gates.chunk(4, 1)
    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    cy = f * cx + i * g
    hy = o * cy.tanh()
    return hy, cy, torch.cat((i, f, g, o), 1)


def lstm_cell_backward(grad_hy: Any, grad_cy: Any, cx: torch.Tensor, cy: torch.Tensor,
                       workspace: torch.Tensor, has_bias: bool) -> tuple[Any, ...]:
    """``aten::_thnn_fused_lstm_cell_backward_impl``: (grad_gates, grad_cx, grad_bias)."""
    if workspace.device.type == "cuda":
        grads: tuple[Any, ...] = aten._thnn_fused_lstm_cell_backward_impl(grad_hy, grad_cy, cx, cy, workspace, has_bias)
        return grads
    i, f, g, o = workspace.chunk(4, 1)
    tanh_cy = cy.tanh()
    grad_c = torch.zeros_like(cy) if grad_cy is None else grad_cy.clone()
    grad_o = torch.zeros_like(cy)
    if grad_hy is not None:
        grad_c = grad_c + grad_hy * o * (1 - tanh_cy * tanh_cy)
        grad_o = grad_hy * tanh_cy
    grad_gates = torch.cat(
        (grad_c * g * i * (1 - i), grad_c * cx * f * (1 - f), grad_c * i * (1 - g * g), grad_o * o * (1 - o)), 1
    )
    return grad_gates, grad_c * f, grad_gates.sum(0) if has_bias else None


def gru_cell(input_gates: torch.Tensor, hidden_gates: torch.Tensor, hx: torch.Tensor,
             input_bias: Any = None, hidden_bias: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``aten::_thnn_fused_gru_cell``: (hy, workspace = r|z|n|hx|hidden new-gate)."""
    if input_gates.device.type == "cuda":
        fused: tuple[torch.Tensor, torch.Tensor] = aten._thnn_fused_gru_cell(input_gates, hidden_gates, hx, input_bias,
                                                                            hidden_bias)
        return fused
    if input_bias is not None:
        input_gates = input_gates + input_bias
        hidden_gates = hidden_gates + hidden_bias
    ir, iz, in_ = input_gates.chunk(3, 1)
    hr, hz, hn = hidden_gates.chunk(3, 1)
    r = (ir + hr).sigmoid()
    z = (iz + hz).sigmoid()
    n = (in_ + r * hn).tanh()
    hy = n + z * (hx - n)
    return hy, torch.cat((r, z, n, hx, hn), 1)


def gru_cell_backward(grad_hy: torch.Tensor, workspace: torch.Tensor, has_bias: bool) -> tuple[Any, ...]:
    """``aten::_thnn_fused_gru_cell_backward``: grads of input gates, hidden gates, hx, biases."""
    if workspace.device.type == "cuda":
        grads: tuple[Any, ...] = aten._thnn_fused_gru_cell_backward(grad_hy, workspace, has_bias)
        return grads
    r, z, n, hx, hn = workspace.chunk(5, 1)
    grad_n = grad_hy * (1 - z) * (1 - n * n)
    grad_z = grad_hy * (hx - n) * z * (1 - z)
    grad_r = grad_n * hn * r * (1 - r)
    grad_input_gates = torch.cat((grad_r, grad_z, grad_n), 1)
    grad_hidden_gates = torch.cat((grad_r, grad_z, grad_n * r), 1)
    grad_hx = grad_hy * z
    if not has_bias:
        return grad_input_gates, grad_hidden_gates, grad_hx, None, None
    return grad_input_gates, grad_hidden_gates, grad_hx, grad_input_gates.sum(0), grad_hidden_gates.sum(0)


def _contiguous_as_on_cuda(kernel: Callable[..., Any]) -> Callable[..., Any]:
    """``kernel`` with a contiguous result on every device, as CUDA's kernel makes it where the
    CPU's keeps the input's memory format (``reflection_pad2d``: ``resize_(...,
    input.suggest_memory_format())`` on the CPU, a plain ``resize_`` on CUDA; the structured
    padding kernels' CPU halves restride their output; ``pixel_shuffle`` and ``channel_shuffle``
    run a contiguous composite on CUDA). The program
    believes it runs on CUDA, and the client promises CUDA's layout (torch's meta kernel
    gives it): a CPU device's result is copied into it."""
    def run(*args: Any, **kwargs: Any) -> Any:
        result = kernel(*args, **kwargs)
        if result.device.type == "cuda" or result.stride() == _contiguous_strides(result.shape):
            return result
        # Not .contiguous(): a fresh allocation's strides, size-1 dimensions' included.
        return result.clone(memory_format=torch.contiguous_format)
    return run


def native_batch_norm(input: torch.Tensor, weight: Any, bias: Any, running_mean: Any, running_var: Any,
                      training: bool, momentum: float, eps: float) -> tuple[torch.Tensor, ...]:
    """``aten::native_batch_norm`` with CUDA's results on every device: the output laid out
    like ``empty_like(input)`` (the CPU kernel uses the input's suggested memory format), and in
    evaluation the saved mean and inverse deviation of the running statistics, shape (C,)
    (the CPU kernel returns empty ones). The client promises CUDA's (torch's meta kernel)."""
    output, save_mean, save_invstd = aten.native_batch_norm.default(
        input, weight, bias, running_mean, running_var, training, momentum, eps)
    if input.device.type == "cuda":
        return output, save_mean, save_invstd
    like_input = torch.empty_like(input)
    if output.stride() != like_input.stride():
        output = like_input.copy_(output)
    if not training and save_mean.numel() == 0 and running_mean is not None and running_var is not None:
        accumulate = save_mean.dtype
        save_mean = running_mean.to(accumulate, copy=True)
        save_invstd = (running_var.to(accumulate) + eps).rsqrt()
    return output, save_mean, save_invstd


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


#: op schema name -> implementation on the daemon's devices
TRANSLATIONS: dict[str, Callable[..., Any]] = {
    "aten::native_batch_norm": native_batch_norm,
    **{f"aten::{name}": _contiguous_as_on_cuda(getattr(aten, name).default._op) for name in (
        "reflection_pad2d", "reflection_pad3d", "replication_pad2d", "replication_pad3d",
        "max_unpool2d", "max_unpool3d", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle",
    )},
    "aten::_thnn_fused_lstm_cell": lstm_cell,
    "aten::_thnn_fused_lstm_cell_backward_impl": lstm_cell_backward,
    "aten::_thnn_fused_gru_cell": gru_cell,
    "aten::_thnn_fused_gru_cell_backward": gru_cell_backward,
    "aten::_scaled_dot_product_fused_attention_overrideable": attention_forward,
    "aten::_scaled_dot_product_fused_attention_overrideable_backward": attention_backward,
}
