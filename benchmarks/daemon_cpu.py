"""The daemon's CPU time per streamed op, side by side with another checkout, rounds interleaved.

    python benchmarks/daemon_cpu.py --against ../old-checkout --rounds 5

A wall-clock "daemon cost per op" is what the daemon reports about itself (benchmarks/run.py),
and a pipelined chain of ops is limited by whichever side is slower (the client, here), so
neither shows a change of the daemon's own cost between two versions. This script asks the
kernel instead: the CPU time of every thread of the daemon's processes (the front, the zygote, the
tenant's worker; or the one process of an older daemon), from ``/proc/PID/task/TID/schedstat``
(nanoseconds), read just before and just after a client's chain of N ``x * a + b`` ops and its
synchronize (benchmarks/checkouts.py). Everything the daemon does for those ops counts: decoding,
checks, execution, accounting, ZeroMQ's I/O threads. Both daemons run with ``--spin-us 0`` (a
daemon that polls for the next message after each one burns CPU while it waits, by design).

Each round runs both checkouts, one after the other, the order reversed every other round;
the figure is the median over rounds, and the ratio the median of each round's own ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil  # (requirements-dev.txt)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.checkouts import CHAIN_CLIENT, REPO, checkout_env, free_address, start_daemon, stop, wait_for  # noqa: E402


def cpu_ns(pid: int) -> int:
    """CPU time, in ns, of every thread of ``pid`` and its descendants."""
    total = 0
    root = psutil.Process(pid)
    for process in [pid, *(child.pid for child in root.children(recursive=True))]:
        try:
            tasks = os.listdir(f"/proc/{process}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{process}/task/{task}/schedstat") as schedstat:
                    total += int(schedstat.read().split()[0])
            except OSError:
                continue
    return total


def daemon_ns_per_op(root: Path, ops: int, workdir: Path) -> float:
    address = free_address()
    daemon = start_daemon(root, address, "--spin-us", "0")
    gate = str(workdir / "gate")
    for suffix in (".go", ".done", ".end"):
        if os.path.exists(gate + suffix):
            os.unlink(gate + suffix)
    script = workdir / "client.py"
    script.write_text(CHAIN_CLIENT)
    client = subprocess.Popen([sys.executable, str(script), str(ops), gate], cwd=root,
                              env=dict(checkout_env(root), LIBREMOTE_SERVER=address, LIBREMOTE_TIMEOUT="300"),
                              stdout=subprocess.PIPE, text=True)
    try:
        line = client.stdout.readline() if client.stdout else ""
        if not line.startswith("READY"):
            raise SystemExit(f"the client did not connect ({root})")
        before = cpu_ns(daemon.pid)
        open(gate + ".go", "w").close()
        wait_for(gate + ".done", client, "its chain of ops ended")
        after = cpu_ns(daemon.pid)
        open(gate + ".end", "w").close()
        client.wait(timeout=120)
    finally:
        stop(client, daemon)
    return (after - before) / ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", type=Path, help="another checkout to measure beside this one")
    parser.add_argument("--ops", type=int, default=20000, help="streamed ops per chain (default 20000)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    roots = {"this checkout": REPO}
    if args.against is not None:
        roots[str(args.against)] = args.against.resolve()
    figures: dict[str, list[float]] = {name: [] for name in roots}
    with tempfile.TemporaryDirectory() as tmp:
        for round_number in range(args.rounds):
            order = list(roots.items()) if round_number % 2 == 0 else list(reversed(roots.items()))
            for name, root in order:
                workdir = Path(tmp) / name.replace("/", "_")
                workdir.mkdir(exist_ok=True)
                figures[name].append(daemon_ns_per_op(root, args.ops, workdir) / 1e3)
            print(f"round {round_number + 1}: " + ", ".join(f"{name} {values[-1]:.2f} us" for name, values in figures.items()),
                  flush=True)
    for name, values in figures.items():
        print(f"{name}: daemon CPU per op, median {statistics.median(values):.2f} us "
              f"(range {min(values):.2f}-{max(values):.2f}) over {len(values)} rounds")
    if len(figures) == 2:
        mine, theirs = figures.values()
        ratios = [a / b for a, b in zip(mine, theirs)]
        print(f"ratio this / {args.against}: median {statistics.median(ratios):.3f} "
              f"(range {min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
