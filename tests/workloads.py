"""Small models and a training loop shared by the graph-mode tests (tests/test_graph_mode.py and
tests/test_compiled_graphs.py): each trains the same workload locally and through the daemon."""

from __future__ import annotations

import torch
from torch import nn

F = nn.functional


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                                  nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


def workload(kind: str):
    """A model (seeded), a batch, its targets and a loss function: ``mlp_batchnorm``, ``cnn`` (with a
    residual block) or a transformer encoder (any other kind)."""
    torch.manual_seed(0)
    if kind == "mlp_batchnorm":
        model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
        data, target = torch.randn(8, 16), torch.randint(0, 4, (8,))
        return model, data, target, F.cross_entropy
    if kind == "cnn":
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), Residual(8), nn.AdaptiveAvgPool2d(1),
                              nn.Flatten(), nn.Linear(8, 10))
        data, target = torch.randn(4, 3, 12, 12), torch.randint(0, 10, (4,))
        return model, data, target, F.cross_entropy
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(32, 5))
    data, target = torch.randn(2, 16, 32), torch.randint(0, 5, (2, 16))
    return model, data, target, lambda out, t: F.cross_entropy(out.flatten(0, 1), t.flatten())


def train_steps(model, data, target, loss_fn, steps: int, trace=None, adam: bool = True):
    """Train ``steps`` steps (AdamW, or SGD with momentum); the losses, and each step's ops when
    ``trace`` (``libremote.op_trace``) is given."""
    # The transformer trains with SGD: attention's key bias has an exactly-zero true gradient, so
    # its computed gradient is rounding noise, which Adam would scale up to +-lr per step.
    optimizer = (torch.optim.AdamW(model.parameters(), lr=1e-2) if adam
                 else torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9))
    losses, traces = [], []
    for _ in range(steps):
        with trace() if trace else _nothing() as ops:
            loss = loss_fn(model(data), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        losses.append(loss.item())
        traces.append(list(ops) if ops is not None else None)
    return losses, traces


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
