"""A daemon and a chain-of-ops client from any checkout of libremote, for side-by-side figures.

benchmarks/op_instructions.py (the client's instructions per op) and benchmarks/daemon_cpu.py
(the daemon's CPU time per op) measure this checkout beside another one, e.g. a worktree of an
older commit: each side runs with its own code (``PYTHONPATH`` and working directory are its
root), its daemon started as that checkout starts it (``libremote_server``, or
``libremote.server`` before the daemon had a package of its own).

The client (:data:`CHAIN_CLIENT`) connects, warms up, prints ``READY PID``, waits for the file
``GATE.go``, runs a chain of ``x * a + b`` (N streamed ops) and a synchronize, creates
``GATE.done``, and waits for ``GATE.end`` before it disconnects: whoever measures does so between
``go`` and ``done``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHAIN_CLIENT = r"""
import os, sys, time
import torch
import libremote

n, gate = int(sys.argv[1]), sys.argv[2]
libremote.connect()
x, a, b = (torch.randn(64, device="cuda") for _ in range(3))
for _ in range(300):
    x = x * a + b
torch.cuda.synchronize()
print("READY", os.getpid(), flush=True)
while not os.path.exists(gate + ".go"):
    time.sleep(0.05)
for _ in range(n // 2):
    x = x * a + b
torch.cuda.synchronize()
open(gate + ".done", "w").close()
while not os.path.exists(gate + ".end"):
    time.sleep(0.05)
libremote.disconnect()
"""


def free_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


def checkout_env(root: Path) -> dict[str, str]:
    """The environment of a process running ``root``'s code (one OpenMP thread: figures per op
    are about the host path, not about how many cores an op may use)."""
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    env.pop("LIBREMOTE_SERVER", None)
    return env


def start_daemon(root: Path, address: str, *extra: str) -> subprocess.Popen:
    """``root``'s daemon on the CPU backend at ``address`` (clients' heartbeats may lag for an
    hour: a client under valgrind is slow)."""
    module = "libremote_server" if (root / "libremote_server").exists() else "libremote.server"
    return subprocess.Popen([sys.executable, "-m", module, "--listen", address, "--device", "cpu",
                             "--log-level", "WARNING", "--heartbeat-timeout", "3600", *extra],
                            cwd=root, env=checkout_env(root), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for(path: str, process: subprocess.Popen, what: str, log: Path | None = None) -> None:
    """Wait until ``path`` exists; fail (with the end of ``log``) if ``process`` ends first."""
    deadline = time.monotonic() + 600
    while not os.path.exists(path):
        if process.poll() is not None or time.monotonic() > deadline:
            tail = ""
            if log is not None:
                tail = "\n".join([line for line in log.read_text().splitlines() if not line.startswith("==")][-15:])
            raise SystemExit(f"the measured client stopped before {what}:\n{tail}")
        time.sleep(0.02)


def stop(*processes: subprocess.Popen) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
