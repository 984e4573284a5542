"""The client's cost per streamed op in CPU instructions (valgrind's callgrind), side by side
with another checkout: a figure that a busy machine does not move.

    python benchmarks/op_instructions.py --against ../old-checkout
    python benchmarks/op_instructions.py --ops 1000,3000     # (default) two chain lengths

Wall-clock per-op figures (benchmarks/run.py) swing by 2-3x on a shared 2-core machine; an
instruction count does not. The client runs under callgrind with instrumentation off; once it
has connected and warmed up, ``callgrind_control -i on`` turns counting on around a chain of
``x * a + b`` ops (and the synchronize that ends it), then off. The count for N ops less the
count for M ops, over N - M, is the client's instructions per op, whatever the fixed costs.
The daemon runs natively beside it (a daemon under valgrind is too slow to keep its clients'
heartbeats). Needs valgrind (Debian's ``valgrind``).

A checkout given with --against runs with its own code (PYTHONPATH and working directory are
its root), its daemon started as that checkout starts it (``libremote_server``, or
``libremote.server`` before the daemon had a package of its own).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CLIENT = r"""
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


def _free_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


def _daemon_module(root: Path) -> str:
    return "libremote_server" if (root / "libremote_server").exists() else "libremote.server"


def _wait_for(path: str, process: subprocess.Popen, what: str, log: Path) -> None:
    deadline = time.monotonic() + 600
    while not os.path.exists(path):
        if process.poll() is not None or time.monotonic() > deadline:
            tail = "\n".join([line for line in log.read_text().splitlines() if not line.startswith("==")][-15:])
            raise SystemExit(f"the measured client stopped before {what}:\n{tail}")
        time.sleep(0.05)


def instructions(root: Path, ops: int, workdir: Path) -> int:
    """Instructions the client at ``root`` spends on a chain of ``ops`` ops (and its sync)."""
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    env.pop("LIBREMOTE_SERVER", None)
    address = _free_address()
    daemon = subprocess.Popen([sys.executable, "-m", _daemon_module(root), "--listen", address, "--device", "cpu",
                               "--log-level", "WARNING", "--heartbeat-timeout", "3600"], cwd=root, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    gate, out = str(workdir / f"gate-{ops}"), workdir / f"callgrind-{ops}.out"
    script, log = workdir / "client.py", workdir / f"client-{ops}.log"
    script.write_text(CLIENT)
    client = subprocess.Popen(["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
                               sys.executable, str(script), str(ops), gate],
                              cwd=root, env=dict(env, LIBREMOTE_SERVER=address, LIBREMOTE_TIMEOUT="300"),
                              stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
    try:
        line = client.stdout.readline() if client.stdout else ""
        if not line.startswith("READY"):
            raise SystemExit(f"the client under valgrind did not connect ({root})")
        pid = line.split()[1]
        subprocess.run(["callgrind_control", "-i", "on", pid], check=True, capture_output=True)
        open(gate + ".go", "w").close()
        _wait_for(gate + ".done", client, "its chain of ops ended", log)
        subprocess.run(["callgrind_control", "-i", "off", pid], check=True, capture_output=True)
        open(gate + ".end", "w").close()
        client.wait(timeout=600)
    finally:
        for process in (client, daemon):
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=60)
    match = re.search(r"^totals: (\d+)", out.read_text(), re.M)
    if match is None:
        raise SystemExit(f"callgrind wrote no totals to {out}")
    return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", type=Path, help="another checkout to measure beside this one")
    parser.add_argument("--ops", default="1000,3000", help="two chain lengths, M,N (default 1000,3000)")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("needs valgrind and callgrind_control (Debian: apt-get install valgrind)")
    short, long = (int(n) for n in args.ops.split(","))
    roots = {"this checkout": REPO}
    if args.against is not None:
        roots[f"{args.against}"] = args.against.resolve()
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        for number, (name, root) in enumerate(roots.items()):
            workdir = Path(tmp) / str(number)  # (gate files of one checkout's runs never meet another's)
            workdir.mkdir()
            counts = [instructions(root, ops, workdir) for ops in (short, long)]
            figures[name] = (counts[1] - counts[0]) / (long - short)
            print(f"{name}: {figures[name]:,.0f} instructions per op (client; {short} ops {counts[0]:,}, "
                  f"{long} ops {counts[1]:,})", flush=True)
    if len(figures) == 2:
        mine, theirs = figures.values()
        print(f"ratio this / {args.against}: {mine / theirs:.3f}")


if __name__ == "__main__":
    main()
