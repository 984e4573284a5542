"""Training through a CPU daemon is bit-identical to local CPU torch: exact, not close.

The daemon's CPU backend runs the same kernels as the local CPU, so every loss, gradient norm,
parameter, optimizer state and evaluation output must be *equal* (``torch.equal``, ``==``), not
within a tolerance: an ulp of difference means libremote changed what runs (an op decomposed
where CPU and CUDA run a kernel, another layout, another reduction order), and such differences
grow under Adam until the model visibly diverges.

The cases are generated: model families (an MLP with dropout, a CNN with BatchNorm and a
UNet-like CNN with GroupNorm, SiLU, upsampling and attention, each in both memory formats, LSTM,
GRU, a Transformer encoder, a Llama-style decoder, a ViT-style patch model) crossed with
optimizers (Adam, AdamW, SGD with momentum, each as foreach, for-loop and fused implementation,
and left to torch, which picks foreach for remote parameters, as for CUDA ones, and the for-loop
for CPU ones), each step with ``clip_grad_norm_`` and an LR scheduler. The model then runs in evaluation mode: under ``no_grad``,
in grad mode and in ``inference_mode``. The exceptions are the families where torch itself runs
other code for a CUDA tensor (:data:`CUDA_PATHS`): those are compared within float tolerance.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from libremote.client.tensor import RemoteTensor

STEPS = 3


# ------------------------------------------------------------------------------------------------
# Model families (small: the whole file runs in CI time)
# ------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Dropout(0.2), nn.Linear(32, 32), nn.Tanh(),
                                 nn.Linear(32, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BatchNormCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Linear(16 * 2 * 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, embedding: int = 8) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(4, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.time = nn.Linear(embedding, cout)
        self.norm2, self.conv2 = nn.GroupNorm(4, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.time(F.silu(t))[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class _SpatialAttention(nn.Module):
    def __init__(self, channels: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(4, channels)
        self.qkv, self.out = nn.Linear(channels, 3 * channels), nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(tokens).view(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
        return x + self.out(attended).transpose(1, 2).reshape(b, c, h, w)


class UNetLike(nn.Module):
    """What a diffusers UNet2D does: GroupNorm, SiLU, convolutions, a timestep embedding, strided
    downsampling, nearest upsampling, skip concatenations and spatial self-attention."""

    def __init__(self) -> None:
        super().__init__()
        self.time = nn.Sequential(nn.Linear(1, 8), nn.SiLU(), nn.Linear(8, 8))
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.down1, self.downsample = _ResBlock(8, 8), nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.down2, self.attention, self.mid = _ResBlock(8, 16), _SpatialAttention(16), _ResBlock(16, 16)
        self.up1, self.upsample, self.up2 = _ResBlock(32, 8), nn.Conv2d(8, 8, 3, padding=1), _ResBlock(16, 8)
        self.norm_out, self.conv_out = nn.GroupNorm(4, 8), nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.time(x.mean((1, 2, 3))[:, None])
        h1 = self.down1(self.stem(x), t)
        h2 = self.attention(self.down2(self.downsample(h1), t))
        u = self.up1(torch.cat([self.mid(h2, t), h2], 1), t)
        u = self.upsample(F.interpolate(u, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(self.up2(torch.cat([u, h1], 1), t))))


class LSTMModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 12, num_layers=2, batch_first=True)
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])


class GRUModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(6, 8, bidirectional=True, batch_first=True)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gru(x)[0].mean(1))


class TransformerModel(nn.Module):
    """nn.TransformerEncoder: MultiheadAttention, LayerNorm, ReLU. (Its inference fast path,
    ``_transformer_encoder_layer_fwd``, is off on both sides: torch skips it while any
    torch-function mode is active, and libremote's is.)"""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 32)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)))


class _RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


class _LlamaBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.attention_norm, self.mlp_norm = _RMSNorm(dim), nn.RMSNorm(dim, eps=1e-6)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.gate, self.up = nn.Linear(dim, 2 * dim, bias=False), nn.Linear(dim, 2 * dim, bias=False)
        self.down = nn.Linear(2 * dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        y = self.attention_norm(x)
        q, k, v = (f(y).view(b, n, self.heads, d // self.heads).transpose(1, 2) for f in (self.q, self.k, self.v))
        attended = F.scaled_dot_product_attention(_rotate(q, cos, sin), _rotate(k, cos, sin), v, is_causal=True)
        x = x + self.o(attended.transpose(1, 2).reshape(b, n, d))
        y = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


class LlamaLike(nn.Module):
    """RMSNorm (by hand and nn.RMSNorm), rotary embeddings, causal SDPA, a SwiGLU MLP and a
    language-model head tied to the embedding."""

    def __init__(self, vocab: int = 32, dim: int = 16, heads: int = 2, length: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(_LlamaBlock(dim, heads) for _ in range(2))
        self.norm = _RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight
        head_dim = dim // heads
        frequencies = torch.outer(torch.arange(length).float(),
                                  1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        angles = torch.cat((frequencies, frequencies), -1)
        self.register_buffer("cos", angles.cos())
        self.register_buffer("sin", angles.sin())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, self.cos[: tokens.shape[1]], self.sin[: tokens.shape[1]])
        return self.head(self.norm(x))


class ViTLike(nn.Module):
    """A timm-style vision transformer: convolutional patch embedding, class token, position
    embedding, pre-norm blocks with fused qkv and SDPA, GELU MLP, class-token head."""

    def __init__(self, dim: int = 16, heads: int = 2, patches: int = 16) -> None:
        super().__init__()
        self.heads = heads
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.position = nn.Parameter(torch.randn(1, patches + 1, dim) * 0.02)
        self.norm1, self.norm2, self.norm = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 5)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.position
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))
        x = x + self.mlp(self.norm2(x))
        return self.head(self.norm(x)[:, 0])


# ------------------------------------------------------------------------------------------------
# Data and losses per family
# ------------------------------------------------------------------------------------------------
def _classification(shape: tuple[int, ...]) -> Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]:
    return lambda g: (torch.randn(4, *shape, generator=g), torch.randint(0, 5, (4,), generator=g))


def _tokens(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, 32, (3, 9), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _denoising(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)


def _sequence_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


#: name -> (model factory, batch maker, loss, memory format of the model and its inputs or None)
FAMILIES: dict[str, tuple[Callable[[], nn.Module], Callable[..., Any], Callable[..., torch.Tensor], Any]] = {
    "mlp": (MLP, _classification((12,)), F.cross_entropy, None),
    "cnn_batchnorm": (BatchNormCNN, _classification((3, 8, 8)), F.cross_entropy, None),
    "cnn_batchnorm_channels_last": (BatchNormCNN, _classification((3, 8, 8)), F.cross_entropy, torch.channels_last),
    "unet_groupnorm": (UNetLike, _denoising, F.mse_loss, None),
    "unet_channels_last": (UNetLike, _denoising, F.mse_loss, torch.channels_last),
    "lstm": (LSTMModel, _classification((5, 6)), F.cross_entropy, None),
    "gru": (GRUModel, _classification((5, 6)), F.cross_entropy, None),
    "transformer": (TransformerModel, _tokens, _sequence_loss, None),
    "llama": (LlamaLike, _tokens, _sequence_loss, None),
    "vit": (ViTLike, _classification((3, 16, 16)), F.cross_entropy, None),
}


# ------------------------------------------------------------------------------------------------
# Optimizers: each of Adam, AdamW and SGD with momentum as foreach, for-loop and fused
# implementation (torch's CPU has fused kernels for all three) and torch's default, with a
# scheduler.
# ------------------------------------------------------------------------------------------------
#: "default": torch's choice, foreach for the remote parameters and the for-loop for local ones.
_IMPLEMENTATIONS = {"foreach": {"foreach": True}, "forloop": {"foreach": False}, "fused": {"fused": True},
                    "default": {}}

_OPTIMIZERS: dict[str, tuple[Callable[..., torch.optim.Optimizer], dict[str, Any], Callable[..., Any]]] = {
    "adam": (torch.optim.Adam, {"lr": 1e-2, "weight_decay": 1e-3},
             lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)),
    "adamw": (torch.optim.AdamW, {"lr": 1e-2, "betas": (0.9, 0.95), "weight_decay": 0.05},
              lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)),
    "sgd": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4},
            lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))),
}

OPTIMIZER_CASES = [f"{name}-{impl}" for name, impl in itertools.product(_OPTIMIZERS, _IMPLEMENTATIONS)]


def _cases() -> list[tuple[str, str]]:
    """Every optimizer case with the MLP; every other family with three of them in turn (each
    of Adam, AdamW and SGD once, the implementations rotating), so that each optimizer case meets
    several families while the file stays CI-sized. The families of :data:`CUDA_PATHS` train
    with SGD only: Adam turns the rounding differences of gradients that are noise (an
    attention key's bias) into steps of the full learning rate, beyond any tolerance."""
    cases = [("mlp", optimizer) for optimizer in OPTIMIZER_CASES]
    implementations = list(_IMPLEMENTATIONS)
    for index, family in enumerate(name for name in FAMILIES if name != "mlp"):
        for offset, name in enumerate(_OPTIMIZERS):
            name = "sgd" if family in CUDA_PATHS else name
            cases.append((family, f"{name}-{implementations[(index + offset) % len(implementations)]}"))
    return cases


def _optimizer(case: str, parameters: Any) -> tuple[torch.optim.Optimizer, Any]:
    name, implementation = case.split("-")
    factory, settings, scheduler = _OPTIMIZERS[name]
    optimizer = factory(parameters, **settings, **_IMPLEMENTATIONS[implementation])
    return optimizer, scheduler(optimizer)


# ------------------------------------------------------------------------------------------------
# One run, local or remote
# ------------------------------------------------------------------------------------------------
def _run(family: str, optimizer_case: str, device: str) -> dict[str, Any]:
    factory, make_batch, loss_fn, memory_format = FAMILIES[family]
    torch.manual_seed(0)
    model = factory()
    if memory_format is not None:
        model = model.to(memory_format=memory_format)
    model = model.to(device)
    optimizer, scheduler = _optimizer(optimizer_case, model.parameters())
    generator = torch.Generator().manual_seed(1)  # the data's
    # Dropout's: seeds the host generator and the device's (which the model's initialisation on
    # the host did not draw from); a CPU daemon draws the same numbers as local torch.
    torch.manual_seed(2)

    def inputs(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(device)
        return tensor.contiguous(memory_format=memory_format) if memory_format is not None else tensor

    record: dict[str, Any] = {"losses": [], "norms": [], "lrs": []}
    model.train()
    for _ in range(STEPS):
        x, y = make_batch(generator)
        optimizer.zero_grad()
        loss = loss_fn(model(inputs(x)), y.to(device))
        loss.backward()
        record["norms"].append(nn.utils.clip_grad_norm_(model.parameters(), 1.0).item())
        optimizer.step()
        scheduler.step()
        record["losses"].append(loss.item())
        record["lrs"].append(scheduler.get_last_lr())
    record["grads"] = {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}
    record["state"] = {n: v.cpu() for n, v in model.state_dict().items()}
    record["optimizer"] = [
        {key: (value.cpu() if isinstance(value, torch.Tensor) else value) for key, value in state.items()}
        for state in optimizer.state.values()
    ]
    record["remote"] = all(isinstance(p, RemoteTensor) for p in model.parameters())
    model.eval()
    x, _ = make_batch(generator)
    with torch.no_grad():
        record["eval_no_grad"] = model(inputs(x)).cpu()
    record["eval_grad"] = model(inputs(x)).detach().cpu()
    with torch.inference_mode():
        record["eval_inference"] = model(inputs(x)).cpu()
    return record


def _assert_tensors_equal(what: str, got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys(), what
    differ = [name for name in expected if not (got[name].dtype == expected[name].dtype and torch.equal(got[name], expected[name]))]
    assert not differ, f"{what} differ from local torch: {differ}"


#: Families where torch itself runs other code for a CUDA tensor than for a CPU one. The program
#: sees a CUDA device, so the client takes CUDA's path, and a CPU daemon runs that path with CPU
#: kernels: the result rounds like neither local CPU torch nor a GPU. These are compared within
#: float tolerance, and must show CUDA's path in the daemon's ops.
#: name -> (an op only CUDA's path runs, where torch branches)
CUDA_PATHS: dict[str, tuple[str, str]] = {
    "lstm": ("aten::_thnn_fused_lstm_cell",
             "aten/src/ATen/native/RNN.cpp: per-step matmuls and a fused cell on CUDA; oneDNN's "
             "whole-sequence mkldnn_rnn_layer (or linear layers with their biases) on the CPU"),
    "gru": ("aten::_thnn_fused_gru_cell", "aten/src/ATen/native/RNN.cpp, as for the LSTM"),
    "unet_channels_last": ("aten::native_group_norm_backward",
                           "tools/autograd/derivatives.yaml, native_group_norm: the backward makes "
                           "its inputs contiguous on CUDA and keeps them channels-last on the CPU, "
                           "whose channels-last kernel reduces in another order"),
}


def _assert_tensors_equal(what: str, got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys(), what
    differ = [name for name in expected
              if not (got[name].dtype == expected[name].dtype and torch.equal(got[name], expected[name]))]
    assert not differ, f"{what} differ from local torch: {differ}"


def _assert_tensors_close(what: str, got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys(), what
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{what} {name}: {m}")


def _optimizer_states(record: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {f"{index}.{key}": torch.as_tensor(value)
            for index, state in enumerate(record["optimizer"]) for key, value in state.items()}


@pytest.mark.parametrize("family,optimizer_case", _cases(), ids=[f"{f}-{o}" for f, o in _cases()])
def test_training_matches_local_torch_bit_for_bit(remote, family: str, optimizer_case: str) -> None:
    with remote.op_trace() as ops:
        got = _run(family, optimizer_case, "cuda")
    expected = _run(family, optimizer_case, "cpu")
    assert got["remote"]
    assert got["lrs"] == expected["lrs"]
    compared = {
        "gradients": (got["grads"], expected["grads"]),
        "parameters and buffers": (got["state"], expected["state"]),
        "optimizer state": (_optimizer_states(got), _optimizer_states(expected)),
        "losses": ({"": torch.tensor(got["losses"])}, {"": torch.tensor(expected["losses"])}),
        "gradient norms": ({"": torch.tensor(got["norms"])}, {"": torch.tensor(expected["norms"])}),
        "outputs in evaluation": ({mode: got[f"eval_{mode}"] for mode in ("no_grad", "grad", "inference")},
                                  {mode: expected[f"eval_{mode}"] for mode in ("no_grad", "grad", "inference")}),
    }
    if family in CUDA_PATHS:
        assert CUDA_PATHS[family][0] in ops, f"{family} did not take CUDA's path"
        for what, (got_tensors, expected_tensors) in compared.items():
            _assert_tensors_close(what, got_tensors, expected_tensors)
        return
    assert got["losses"] == expected["losses"]
    assert got["norms"] == expected["norms"]
    for what, (got_tensors, expected_tensors) in compared.items():
        _assert_tensors_equal(what, got_tensors, expected_tensors)


@pytest.mark.parametrize("activation", [F.silu, F.mish])
def test_activation_backward_is_one_op_as_on_cuda(remote, activation: Callable[..., torch.Tensor]) -> None:
    """``silu_backward`` and ``mish_backward`` have CPU and CUDA kernels and a composite
    fallback, which the dispatcher would run for the remote device (five ops, rounded otherwise:
    SwiGLU and UNet gradients an ulp off). They travel as one op, in inference mode too."""
    torch.manual_seed(0)
    x, grad = torch.randn(64), torch.randn(64)
    expected = torch.autograd.grad(activation(x.requires_grad_()), x, grad)[0]
    remote_x = x.detach().cuda().requires_grad_()
    with remote.op_trace() as ops:
        got = torch.autograd.grad(activation(remote_x), remote_x, grad.cuda())[0]
    name = f"aten::{activation.__name__}_backward"
    assert name in ops and "aten::sigmoid" not in ops and "aten::tanh" not in ops, ops
    assert torch.equal(got.cpu(), expected)
    backward = getattr(torch.ops.aten, f"{activation.__name__}_backward")
    with torch.inference_mode():
        inference_grad, inference_x = grad.cuda(), x.detach().cuda()
        with remote.op_trace() as ops:
            got = backward(inference_grad, inference_x)
    assert ops == [name]
    assert torch.equal(got.cpu(), backward(grad, x.detach()))


def test_inference_mode_views_and_composites_as_on_the_cpu(remote) -> None:
    """In ``inference_mode`` a view of a parameter is a normal tensor that requires grad (a
    ViT's ``cls_token.expand(...)`` failed: "Cannot set version_counter for inference tensor"),
    and composite ops decompose as on the CPU: ``linear`` of a transposed batch folds into one
    ``mm`` because its weight requires grad (``bmm`` instead rounds otherwise), and
    ``upsample_nearest2d.vec`` runs torch's C++ composite, not its Python decomposition (which
    made a tensor on ``input.device``, cuda)."""
    torch.manual_seed(0)
    token, linear = nn.Parameter(torch.randn(1, 1, 4)), nn.Linear(4, 5)
    batch, image = torch.randn(4, 3, 4).transpose(0, 1), torch.randn(1, 2, 3, 3)
    remote_token, remote_linear = nn.Parameter(token.detach().cuda()), copy.deepcopy(linear).cuda()

    def evaluate(token: torch.Tensor, linear: nn.Module, batch: torch.Tensor, image: torch.Tensor) -> list[torch.Tensor]:
        with torch.inference_mode():
            expanded = token.expand(2, -1, -1)
            assert not expanded.is_inference() and expanded.requires_grad
            return [expanded * 2, linear(batch), F.interpolate(image, scale_factor=2.0, mode="nearest")]

    expected = evaluate(token, linear, batch, image)
    with remote.op_trace() as ops:
        got = evaluate(remote_token, remote_linear, batch.cuda(), image.cuda())
    assert "aten::mm" in ops and "aten::bmm" not in ops, ops
    for got_tensor, expected_tensor in zip(got, expected):
        assert got_tensor.is_inference() and torch.equal(got_tensor.cpu(), expected_tensor)
