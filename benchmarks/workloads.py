"""Training workloads used by the benchmarks, built the same way on every device."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class _Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


class _GPT(nn.Module):
    def __init__(self, vocab: int, width: int, layers: int, heads: int, context: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        return self.head(self.blocks(x, mask=self.mask[: tokens.shape[1], : tokens.shape[1]], is_causal=True))


Step = Callable[[], float]


def training_kinds(size: str) -> tuple[str, ...]:
    """The training workloads of a benchmark size: CI-sized ones, or the issue's GPU shapes
    (GPT-2-small at batch 2 x 256 and 8 x 512, ResNet-50 at batch 64)."""
    return ("mlp", "cnn", "gpt") if size == "ci" else ("mlp", "resnet50", "gpt2-2x256", "gpt2-8x512")


def make_step(kind: str, device: str, size: str = "ci", compiled: bool = False, capturable: bool = False) -> Step:
    """A training step closure for ``kind`` (mlp, cnn, gpt) on ``device``; returns the loss.
    ``compiled``: the model goes through ``torch.compile`` (graph mode under libremote);
    ``capturable``: AdamW keeps its step count on the device (for ``libremote.capture_step``)."""
    torch.manual_seed(0)
    if kind == "mlp":
        width = 512 if size == "ci" else 4096
        model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
        data, target = torch.randn(128, width), torch.randint(0, 10, (128,))
        loss_fn: Callable = nn.functional.cross_entropy
    elif kind == "cnn":
        channels, batch = (16, 16) if size == "ci" else (64, 64)
        model = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(), _Block(channels), _Block(channels),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10))
        data, target = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
        loss_fn = nn.functional.cross_entropy
    elif kind == "resnet50":
        import torchvision  # on GPU servers only; the CI-sized runs use "cnn"

        model = torchvision.models.resnet50()
        data, target = torch.randn(64, 3, 224, 224), torch.randint(0, 1000, (64,))
        loss_fn = nn.functional.cross_entropy
    elif kind.startswith("gpt"):
        shapes = {"gpt": (512, 128, 2, 4, 256, 2), "gpt2-2x256": (50257, 768, 12, 12, 256, 2),
                  "gpt2-8x512": (50257, 768, 12, 12, 512, 8)}
        vocab, width, layers, heads, context, batch = shapes[kind]
        model = _GPT(vocab, width, layers, heads, context)
        data = torch.randint(0, vocab, (batch, context))
        target = torch.randint(0, vocab, (batch, context))

        def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
    else:
        raise ValueError(kind)
    model = model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, capturable=capturable)
    data, target = data.to(device), target.to(device)
    forward = torch.compile(model) if compiled else model

    def step() -> float:
        loss = loss_fn(forward(data), target)
        optimizer.zero_grad(set_to_none=not capturable)
        loss.backward()
        optimizer.step()
        return loss

    return step
