"""A tensor moved between devices of two daemons: daemon to daemon (``t.to("cuda:1")``, EXPORT and
PULL) beside the path through the client (``t.cpu().to("cuda:1")``) and a raw pyzmq transfer of
the same bytes, in the same run.

    python benchmarks/cross_server.py                 # two daemons on the CPU backend, loopback
    python benchmarks/cross_server.py --device cuda   # on a GPU server (both daemons on it)
    python benchmarks/cross_server.py --mib 256

What it shows: daemon to daemon moves the bytes once (one TCP transfer between the workers, plus
the exporting worker's snapshot and the pulling worker's copy into place) where the path through
the client moves them twice; the client's own bytes stay at a few hundred per copy.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.raw_zmq import RawPeer  # noqa: E402
from benchmarks.run import _env, _free_address, _start_daemon  # noqa: E402


def client_figures(nbytes: int) -> dict:
    """Run in the client process, with LIBREMOTE_SERVER naming the two daemons."""
    import torch

    import libremote  # noqa: F401
    from libremote.client import runtime

    source = torch.randn(nbytes // 4, device="cuda:0")
    torch.cuda.synchronize()

    def best(move) -> float:
        times = []
        for _ in range(5):
            started = time.perf_counter()
            moved = move()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
            del moved
        return min(times)

    client_bytes = lambda: sum(s.connection.bytes_received + s.connection.bytes_sent for s in runtime.sessions())  # noqa: E731
    before = client_bytes()
    direct = best(lambda: source.to("cuda:1"))
    direct_client_bytes = (client_bytes() - before) / 5
    through = best(lambda: source.cpu().to("cuda:1"))
    return {"direct_gbps": nbytes / direct / 1e9, "through_client_gbps": nbytes / through / 1e9,
            "client_bytes_per_direct_copy": direct_client_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="the daemons' device (cpu, cuda, auto)")
    parser.add_argument("--mib", type=int, default=64, help="tensor size in MiB")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    nbytes = args.mib << 20
    if args.client:
        print(json.dumps(client_figures(nbytes)))
        return
    peer = RawPeer(_free_address())
    try:
        raw = peer.upload_gbps(nbytes)
    finally:
        peer.close()
    addresses = [_free_address(), _free_address()]
    daemons = [_start_daemon(address, args.device) for address in addresses]
    try:
        output = subprocess.run([sys.executable, "-m", "benchmarks.cross_server", "--client", "--mib", str(args.mib)],
                                cwd=REPO, env=_env() | {"LIBREMOTE_SERVER": ",".join(addresses)},
                                capture_output=True, text=True, timeout=900)
    finally:
        for daemon in daemons:
            daemon.terminate()
            daemon.wait(30)
    if output.returncode != 0:
        raise SystemExit(f"benchmark client failed:\n{output.stderr}")
    figures = json.loads(output.stdout.strip().splitlines()[-1])
    print(f"\n{args.mib} MiB from cuda:0 to cuda:1 on two daemons, {platform.node()} ({os.cpu_count()} cores), "
          f"device {args.device}, loopback\n")
    print(f"{'':<40}{'GB/s':>8}{'vs raw':>10}")
    print(f"{'raw pyzmq, one transfer':<40}{raw:>8.2f}{1:>9.2f}x")
    print(f"{'t.to(cuda:1), daemon to daemon':<40}{figures['direct_gbps']:>8.2f}{figures['direct_gbps'] / raw:>9.2f}x")
    print(f"{'t.cpu().to(cuda:1), through the client':<40}{figures['through_client_gbps']:>8.2f}"
          f"{figures['through_client_gbps'] / raw:>9.2f}x")
    print(f"client bytes per daemon-to-daemon copy: {figures['client_bytes_per_direct_copy']:.0f}")


if __name__ == "__main__":
    main()
