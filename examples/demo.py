"""libremote's main job on one machine: a daemon, a client training through it, and an
unmodified script opted in by an environment variable.

    python examples/demo.py                 # daemon on the CPU backend, on a free loopback port
    python examples/demo.py --device auto   # the daemon takes the machine's GPU if it has one
    LIBREMOTE_SERVER=tcp://gpu01:7777 python examples/demo.py   # use a daemon already running

The client's results are checked against the same training run in plain local torch.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


def start_daemon(address: str, device: str) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "libremote.server", "--listen", address, "--device", device],
        stderr=subprocess.PIPE, text=True,
    )
    assert process.stderr is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if line:
            print(f"[daemon] {line.rstrip()}")
        if "listening on" in line:
            threading.Thread(target=_echo, args=(process.stderr,), daemon=True).start()
            return process
        if process.poll() is not None:
            break
    raise SystemExit(f"the daemon did not start (exit code {process.poll()})")


def _echo(stream) -> None:
    for line in stream:
        print(f"[daemon] {line.rstrip()}")


def train(device: str, steps: int) -> list[float]:
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 1))
    data = torch.randn(256, 32)
    target = data[:, :1] * 2 - data[:, 1:2]
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    x, y = data.to(device), target.to(device)
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="daemon device: cpu (default), auto, cuda, cuda:N")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    daemon = None
    address = os.environ.get("LIBREMOTE_SERVER")
    if not address:
        address = free_address()
        daemon = start_daemon(address, args.device)
    try:
        import torch

        import libremote

        info = libremote.connect(address)
        print(f"\nconnected to {address}: session {info['session']}, daemon torch {info['torch']}")
        print(f"torch.cuda.is_available() = {torch.cuda.is_available()}, device: {torch.cuda.get_device_name()}")

        started = time.perf_counter()
        remote_losses = train("cuda", args.steps)
        remote_s = time.perf_counter() - started
        local_losses = train("cpu", args.steps)
        worst = max(abs(a - b) for a, b in zip(remote_losses, local_losses))
        print("\nstep  loss via libremote   loss in local torch")
        for step in range(0, args.steps, max(1, args.steps // 5)):
            print(f"{step:4d}  {remote_losses[step]:18.6f}  {local_losses[step]:18.6f}")
        print(f"largest difference over {args.steps} steps: {worst:.2e} ({remote_s:.2f} s through libremote)")
        print(f"session memory on the daemon: {torch.cuda.memory_allocated() / 1024:.1f} KiB allocated")
        libremote.disconnect()

        print("\nan unmodified script, opted in with LIBREMOTE_SERVER:")
        env = dict(os.environ, LIBREMOTE_SERVER=address)
        result = subprocess.run([sys.executable, str(HERE / "unmodified_train.py")], env=env)
        ok = worst < 1e-4 and result.returncode == 0
        print("\ndemo", "passed" if ok else "FAILED")
        return 0 if ok else 1
    finally:
        if daemon is not None:
            daemon.terminate()
            daemon.wait(timeout=15)


if __name__ == "__main__":
    sys.exit(main())
