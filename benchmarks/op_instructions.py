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

A checkout given with --against runs with its own code (see benchmarks/checkouts.py).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.checkouts import CHAIN_CLIENT, REPO, checkout_env, free_address, start_daemon, stop, wait_for  # noqa: E402


def instructions(root: Path, ops: int, workdir: Path) -> int:
    """Instructions the client at ``root`` spends on a chain of ``ops`` ops (and its sync)."""
    env = checkout_env(root)
    address = free_address()
    daemon = start_daemon(root, address)
    gate, out = str(workdir / f"gate-{ops}"), workdir / f"callgrind-{ops}.out"
    script, log = workdir / "client.py", workdir / f"client-{ops}.log"
    script.write_text(CHAIN_CLIENT)
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
        wait_for(gate + ".done", client, "its chain of ops ended", log)
        subprocess.run(["callgrind_control", "-i", "off", pid], check=True, capture_output=True)
        open(gate + ".end", "w").close()
        client.wait(timeout=600)
    finally:
        stop(client, daemon)
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
