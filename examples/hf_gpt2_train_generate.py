"""A Hugging Face transformers program with no libremote in it: a small GPT-2 (tied input and
output embeddings, built from a config: nothing is downloaded) trained a few steps with AdamW,
then decoded greedily with ``generate()``.

The optimizer is created before the model moves to the device, as Hugging Face accelerate does.
Run it with a daemon's address in the environment and its ``cuda`` is the remote GPU:

    LIBREMOTE_SERVER=tcp://127.0.0.1:7777 python examples/hf_gpt2_train_generate.py [params.pt]

It prints one JSON line (device, whether the embeddings are still tied, the losses, the generated
ids) and, given a path, saves the trained parameters there. Needs ``pip install transformers``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel

VOCAB = 101


def build() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=VOCAB, n_positions=64,
                        bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout: same numbers anywhere
    return GPT2LMHeadModel(config)


def run(device: str, steps: int = 5) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    model = build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.to(device)
    model.train()
    data = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        batch = data.to(device)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    prompt = data[:2, :5].to(device)
    with torch.no_grad():
        generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                   do_sample=False, pad_token_id=0)
    report = {
        "device": str(model.device),
        "tied": model.lm_head.weight is model.transformer.wte.weight,
        "losses": losses,
        "generated": generated.tolist(),
    }
    return report, {name: param.detach().cpu() for name, param in model.named_parameters()}


if __name__ == "__main__":
    report, parameters = run("cuda" if torch.cuda.is_available() else "cpu")
    print(json.dumps(report))
    if len(sys.argv) > 1:
        torch.save(parameters, sys.argv[1])
