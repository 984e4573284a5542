"""A Hugging Face accelerate program with no libremote in it, written the way accelerate's docs
show: ``Accelerator()``, a model and an optimizer built first, ``accelerator.prepare(model,
optimizer, dataloader)``, ``accelerator.backward(loss)``, then a checkpoint round trip with
``save_state()`` / ``load_state()``.

The model ties its output projection to its embedding weight (as language models do), so the
checkpoint exercises accelerate's handling of shared tensors. Phases: train, ``save_state(dir)``,
train more, ``load_state(dir)``, train again. The last phase replays the second one from the same
state, so its losses must equal the second phase's.

Run it with a daemon's address in the environment and its ``cuda`` is the remote GPU:

    LIBREMOTE_SERVER=tcp://127.0.0.1:7777 python examples/accelerate_train_checkpoint.py OUT_DIR

Without ``LIBREMOTE_SERVER`` on a CPU-only host accelerate picks the CPU. It writes the checkpoint
to ``OUT_DIR/checkpoint``, the final state dict (device tensors, as ``accelerator.save`` writes
them) to ``OUT_DIR/final.pt`` and prints one JSON line (device, distributed type, whether the
weights are still tied, the losses of each phase, draws from the random generators after
``save_state`` and after ``load_state``). ``ACCELERATE_MIXED_PRECISION=fp16`` (what ``accelerate
launch --mixed_precision fp16`` sets) turns on autocast and a gradient scaler, as usual. Needs
``pip install accelerate``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

VOCAB = 37
WIDTH = 16


class TiedLM(nn.Module):
    """Embedding, one hidden layer, and an output projection that shares the embedding weight."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.hidden = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(self.embed(tokens))))


def data() -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (32, 8), generator=generator)
    targets = torch.randint(0, VOCAB, (32, 8), generator=generator)
    return DataLoader(TensorDataset(tokens, targets), batch_size=8, shuffle=False)


def train(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer,
          loader: DataLoader) -> list[float]:
    """One pass over the (unshuffled) data; the losses of each step."""
    losses = []
    model.train()
    for tokens, targets in loader:
        logits = model(tokens)
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def rng_probe(accelerator: Accelerator) -> list[float]:
    """Draws from the CPU and the device generators: equal probes after ``save_state`` and after
    ``load_state`` mean both generators were saved and restored."""
    return torch.rand(2).tolist() + torch.rand(2, device=accelerator.device).tolist()


def main(out: Path) -> None:
    accelerator = Accelerator()
    torch.manual_seed(0)
    model = TiedLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer, loader = accelerator.prepare(model, optimizer, data())
    first = train(accelerator, model, optimizer, loader)
    accelerator.save_state(str(out / "checkpoint"))
    probes = [rng_probe(accelerator)]
    second = train(accelerator, model, optimizer, loader)
    accelerator.load_state(str(out / "checkpoint"))
    probes.append(rng_probe(accelerator))
    third = train(accelerator, model, optimizer, loader)
    unwrapped = accelerator.unwrap_model(model)
    accelerator.save(unwrapped.state_dict(), out / "final.pt")  # device tensors, tie included
    print(json.dumps({
        "device": str(accelerator.device),
        "distributed_type": str(accelerator.distributed_type),
        "tied": unwrapped.head.weight is unwrapped.embed.weight,
        "parameter_device": str(next(unwrapped.parameters()).device),
        "losses": [first, second, third],
        "rng_probes": probes,
    }))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
