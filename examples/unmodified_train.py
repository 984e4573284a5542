"""A plain PyTorch training script: no libremote in it anywhere.

Run it with a daemon's address in the environment and its ``cuda`` is the remote GPU:

    LIBREMOTE_SERVER=tcp://127.0.0.1:7777 python examples/unmodified_train.py
"""

import torch
from torch import nn

device = "cuda" if torch.cuda.is_available() else "cpu"
print(f"device: {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'host CPU'})")

torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 14 * 14, 10))
model = model.to(device)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
images = torch.randn(64, 1, 28, 28)
labels = torch.randint(0, 10, (64,))

for step in range(5):
    x, y = images.to(device), labels.to(device)
    loss = nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"step {step}: loss {loss.item():.4f}")
