"""``torch.autocast("cuda")`` for remote tensors.

Layer 4, the torch-facing facade.

torch ships autocast kernels for CUDA, CPU, XPU, MPS, ... but none for PrivateUse1 (the key our
tensors carry): with autocast enabled for it, every op would fail; with it off, ``autocast("cuda")``
would be silently ignored. So:

* entering ``autocast("cuda")`` also enables autocast for the ``remote`` device with the same
  dtype (``autocast.__enter__``/``__exit__`` replaced, see :mod:`.patches`), and
* kernels on the ``AutocastPrivateUse1`` key apply CUDA's cast policy (the op lists of torch's
  ``aten/src/ATen/autocast_mode.cpp``): lower-precision ops cast floating inputs to the autocast
  dtype, fp32 ops to float32, promote ops to the widest input type; then the op runs below
  autocast. Every other op falls through. Casts happen above autograd, so gradients flow back
  through them as with CUDA. (Unlike CUDA's, casts are not cached across ops in a region.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_map

from . import backend

LOWER_PRECISION_OPS = frozenset(
    """_convolution conv1d conv2d conv3d conv_tbc conv_transpose1d conv_transpose2d conv_transpose3d
    convolution prelu addmm addmv addr matmul einsum mm mv linalg_vecdot linear addbmm baddbmm bmm
    chain_matmul linalg_multi_dot _thnn_fused_lstm_cell _thnn_fused_gru_cell lstm_cell gru_cell
    rnn_tanh_cell rnn_relu_cell _scaled_dot_product_flash_attention scaled_dot_product_attention
    _scaled_dot_product_fused_attention_overrideable""".split()
)
FP32_OPS = frozenset(
    """acos asin cosh erfinv exp expm1 log log10 log2 log1p reciprocal rsqrt sinh tan pow softplus
    layer_norm native_layer_norm group_norm frobenius_norm nuclear_norm cosine_similarity
    poisson_nll_loss cosine_embedding_loss nll_loss nll_loss2d hinge_embedding_loss kl_div l1_loss
    smooth_l1_loss huber_loss mse_loss margin_ranking_loss multilabel_margin_loss soft_margin_loss
    triplet_margin_loss multi_margin_loss binary_cross_entropy_with_logits dist pdist cdist renorm
    logsumexp upsample_nearest1d _upsample_nearest_exact1d upsample_nearest2d
    _upsample_nearest_exact2d upsample_nearest3d _upsample_nearest_exact3d upsample_linear1d
    upsample_bilinear2d _upsample_bilinear2d_aa upsample_trilinear3d upsample_bicubic2d
    _upsample_bicubic2d_aa prod softmax log_softmax cumprod cumsum sum norm linalg_vector_norm
    linalg_matrix_norm""".split()
)
PROMOTE_OPS = frozenset(
    """addcdiv addcmul atan2 bilinear cross dot grid_sampler index_put scatter_add tensordot cat
    stack""".split()
)

_EXCLUDE_AUTOCAST = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastPrivateUse1)


def _eligible(value: Any) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and value.device.type in ("cuda", backend.BACKEND_NAME)
        and value.is_floating_point()
        and value.dtype is not torch.float64
    )


def _cast_all(args: Any, kwargs: Any, dtype: torch.dtype) -> tuple[Any, Any]:
    def cast(value: Any) -> Any:
        return value.to(dtype) if _eligible(value) and value.dtype is not dtype else value

    return tree_map(cast, args), tree_map(cast, kwargs)


def _lower_precision(op: Any, args: Any, kwargs: Any) -> Any:
    return _cast_all(args, kwargs, torch.get_autocast_dtype(backend.BACKEND_NAME))


def _fp32(op: Any, args: Any, kwargs: Any) -> Any:
    return _cast_all(args, kwargs, torch.float32)


def _promote(op: Any, args: Any, kwargs: Any) -> Any:
    widest = None
    for value in torch.utils._pytree.tree_leaves((args, kwargs)):
        if _eligible(value):
            widest = value.dtype if widest is None else torch.promote_types(widest, value.dtype)
    return (args, kwargs) if widest is None else _cast_all(args, kwargs, widest)


def _autocast_kernel(op: torch._ops.OpOverload, policy: Callable[..., Any]) -> Callable[..., Any]:
    def kernel(*args: Any, **kwargs: Any) -> Any:
        with torch._C._ExcludeDispatchKeyGuard(_EXCLUDE_AUTOCAST):
            args, kwargs = policy(op, args, kwargs)
            return op(*args, **kwargs)

    return kernel


_original_enter = torch.amp.autocast_mode.autocast.__enter__
_original_exit = torch.amp.autocast_mode.autocast.__exit__


def _autocast_enter(self: Any) -> Any:
    """``autocast.__enter__``: for ``cuda``, also autocast on the remote device, alike."""
    result = _original_enter(self)
    if self.device == "cuda" and not torch._jit_internal.is_scripting():
        name = backend.BACKEND_NAME
        self._libremote_saved = (torch.is_autocast_enabled(name), torch.get_autocast_dtype(name))
        torch.set_autocast_enabled(name, self._enabled)
        torch.set_autocast_dtype(name, self.fast_dtype)
    return result


def _autocast_exit(self: Any, exc_type: Any, exc_val: Any, exc_tb: Any) -> Any:
    """``autocast.__exit__``: the remote device's autocast state back as it was."""
    saved = self.__dict__.pop("_libremote_saved", None)
    if saved is not None:
        torch.set_autocast_enabled(backend.BACKEND_NAME, saved[0])
        torch.set_autocast_dtype(backend.BACKEND_NAME, saved[1])
    return _original_exit(self, exc_type, exc_val, exc_tb)


def register() -> list[torch.library.Library]:
    """Autocast kernels for every overload of the listed ops; all other ops fall through.

    (Per-op kernels, not one Python fallback: torch's Python fallback path cannot take
    tensor-subclass arguments, see the README's notes.)
    """
    fallthrough = torch.library.Library("_", "IMPL")
    fallthrough.fallback(torch.library.fallthrough_kernel, "AutocastPrivateUse1")
    kernels = torch.library.Library("aten", "IMPL")
    for names, policy in ((LOWER_PRECISION_OPS, _lower_precision), (FP32_OPS, _fp32), (PROMOTE_OPS, _promote)):
        for name in names:
            packet = getattr(torch.ops.aten, name, None)
            if packet is None:
                continue
            for overload_name in packet.overloads():
                overload = getattr(packet, overload_name)
                qualified = name if overload_name == "default" else f"{name}.{overload_name}"
                kernels.impl(qualified, _autocast_kernel(overload, policy), "AutocastPrivateUse1")
    return [fallthrough, kernels]
