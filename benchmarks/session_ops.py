"""A worker's cost per op with the transport taken away: its ``Session`` in-process, fed decoded
commands, side by side with another checkout, rounds interleaved.

    python benchmarks/session_ops.py --against ../old-checkout --rounds 5

benchmarks/daemon_cpu.py counts everything a daemon spends per op (decoding, ZeroMQ's threads,
the front); this times only what a worker's session does with a command once it is decoded:
checks, accounting, the aten call. The commands are what a client's chain of ``x * a + b`` on 64
floats sends (two OPs, then a FREE of the product and the x replaced), 10,000 ops a block; the
figure is the best block's microseconds per op. In one process, on one core, it moves little
with the machine's load, and a profiler run over it (``py-spy record -- python
benchmarks/session_ops.py --child .``) shows the worker's per-op path alone.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OPS_PER_BLOCK = 10_000


def _session_classes(root: Path) -> tuple[Any, Any, Any]:
    """``root``'s Session, HandleRef and Cmd (the daemon was ``server/`` before it had a package
    of its own, and importing libremote then activated the client)."""
    sys.path.insert(0, str(root))
    if (root / "libremote_server").exists():
        from libremote_server.worker.session import Session
        from libremote_wire.codec import HandleRef
        from libremote_wire.messages import Cmd
        return Session, HandleRef, Cmd
    import libremote  # noqa: F401
    from libremote.client import activation  # type: ignore[attr-defined]
    activation.deactivate()
    from libremote.protocol import Cmd, HandleRef  # type: ignore[attr-defined]
    from server.session import Session  # type: ignore[import-not-found]
    return Session, HandleRef, Cmd


def child(root: Path, blocks: int) -> float:
    """Best microseconds per op over ``blocks`` blocks, in this process."""
    os.chdir(root)
    Session, HandleRef, Cmd = _session_classes(root)
    import torch

    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    gc.collect()
    gc.freeze()  # (as the worker's zygote does)
    session = Session("benchmark", [torch.device("cpu")], {})
    for handle in (1, 2, 3):  # x, a, b
        session._store(handle, torch.randn(64))
    x, next_handle = 1, 10

    def chain(pairs: int, define: bool = False) -> list[Any]:
        nonlocal x, next_handle
        commands = []
        for i in range(pairs):
            product, total = next_handle, next_handle + 1
            mul = [0, "aten::mul.Tensor"] if define and i == 0 else 0
            add = [1, "aten::add.Tensor"] if define and i == 0 else 1
            commands.append([int(Cmd.OP), mul, [HandleRef(x), HandleRef(2)], {}, [product]])
            commands.append([int(Cmd.OP), add, [HandleRef(product), HandleRef(3)], {}, [total]])
            if x != 1:  # (the product and the x it replaces die together, before the next op)
                commands.append([int(Cmd.FREE), [product, x]])
            else:
                commands.append([int(Cmd.FREE), [product]])
            x, next_handle = total, next_handle + 2
        return commands

    def run(commands: list[Any]) -> None:
        session.enqueue(0, commands, [], False)
        while session.queue:
            session.run_slice(1 << 30)

    run(chain(500, define=True))
    best = float("inf")
    for _ in range(blocks):
        batches = [chain(250) for _ in range(OPS_PER_BLOCK // 500)]
        started = time.perf_counter()
        for commands in batches:
            run(commands)
        best = min(best, time.perf_counter() - started)
    return best / OPS_PER_BLOCK * 1e6


def measure(root: Path, blocks: int) -> float:
    output = subprocess.run([sys.executable, __file__, "--child", str(root), "--blocks", str(blocks)],
                            env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, check=True)
    return float(output.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", type=Path, help="another checkout to measure beside this one")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--blocks", type=int, default=7, help="blocks of 10,000 ops per measurement")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(f"{child(args.child.resolve(), args.blocks):.3f}")
        return
    roots = [REPO] + ([args.against.resolve()] if args.against else [])
    figures: dict[Path, list[float]] = {root: [] for root in roots}
    for round_number in range(args.rounds):
        for root in roots if round_number % 2 == 0 else reversed(roots):
            figures[root].append(measure(root, args.blocks))
        print(f"round {round_number + 1}: " + ", ".join(f"{_name(root)} {figures[root][-1]:.2f} us" for root in roots))
    for root in roots:
        values = figures[root]
        print(f"{_name(root)}: session time per op, median {statistics.median(values):.2f} us "
              f"(range {min(values):.2f}-{max(values):.2f}) over {len(values)} rounds")
    if args.against:
        ratios = [mine / theirs for mine, theirs in zip(figures[REPO], figures[roots[1]])]
        print(f"ratio this / {roots[1]}: median {statistics.median(ratios):.3f} "
              f"(range {min(ratios):.3f}-{max(ratios):.3f})")


def _name(root: Path) -> str:
    return "this checkout" if root == REPO else str(root)


if __name__ == "__main__":
    main()
