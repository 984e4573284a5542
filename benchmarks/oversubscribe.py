"""Tenants whose memory adds up to more than the device holds: every byte checked, time reported.

    python benchmarks/oversubscribe.py --device cuda --clients 3 --gib 40 --host-spill 64GiB
    python benchmarks/oversubscribe.py --device cpu --clients 3 --gib 0.25 --device-memory 256MiB \\
        --host-spill 1GiB                      # the same on the CPU backend, at toy size

Each client process fills ``--gib`` of live tensors on the daemon in 1 GiB blocks (``--block``),
each block ``torch.randn`` under its own seed, and holds them all. When every client has filled,
each one regenerates every block from its seed on the daemon and checks ``torch.equal`` against
the block it holds, which by then has been spilled to host RAM and brought back, possibly more
than once. It prints the fill and check times, the daemon's spill traffic, and the plain
host<->device copy rate of this machine as the reference for the spill and restore rates.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.run import _env, _free_address, _start_daemon  # noqa: E402
from benchmarks.spill import _local_copy_gbps  # noqa: E402

CLIENT = r"""
import json, os, sys, time, torch, libremote
libremote.connect(os.environ["BENCH_SERVER"])
client, blocks, elements = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])

def block(i):
    torch.cuda.manual_seed(1_000_003 * client + i)
    return torch.randn(elements, device="cuda")

start = time.perf_counter()
held = [block(i) for i in range(blocks)]
torch.cuda.synchronize()
fill_s = time.perf_counter() - start
print(json.dumps({"filled": fill_s}), flush=True)
sys.stdin.readline()  # wait until every client has filled
start = time.perf_counter()
mismatched = [i for i in range(blocks) if not torch.equal(held[i], block(i))]
check_s = time.perf_counter() - start
stats = libremote.memory_stats()
print(json.dumps({"fill_s": fill_s, "check_s": check_s, "mismatched": mismatched, "allocated": stats["allocated"],
                  "device": stats.get("device", {})}), flush=True)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--gib", type=float, default=40.0, help="live tensors per client, in GiB")
    parser.add_argument("--block", type=float, default=1.0, help="size of each tensor, in GiB")
    parser.add_argument("--host-spill", default="64GiB")
    parser.add_argument("--device-memory", default=None, help="device budget (default: the daemon's)")
    args = parser.parse_args()

    block_bytes = int(args.block * (1 << 30)) // 4 * 4
    blocks = max(1, round(args.gib / args.block))
    quota = int(args.gib * 1.1 * (1 << 30)) + (2 << 30)  # the blocks, and one block being checked
    flags = ["--host-spill", args.host_spill, "--memory-quota", str(quota)]
    flags += ["--device-memory", args.device_memory] if args.device_memory else []
    address = _free_address()
    daemon = _start_daemon(address, args.device, extra=flags)
    clients = []
    try:
        for index in range(args.clients):
            clients.append(subprocess.Popen(
                [sys.executable, "-c", CLIENT, str(index), str(blocks), str(block_bytes // 4)],
                cwd=REPO, env=_env() | {"BENCH_SERVER": address},
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            ))
        started = time.perf_counter()
        fills = [json.loads(_line(client)) for client in clients]
        fill_wall = time.perf_counter() - started
        started = time.perf_counter()
        for client in clients:
            client.stdin.write("check\n")
            client.stdin.flush()
        results = [json.loads(_line(client)) for client in clients]
        check_wall = time.perf_counter() - started
    finally:
        for client in clients:
            client.kill()
        daemon.terminate()
        daemon.wait(60)

    device = results[-1]["device"]
    total = sum(r["allocated"] for r in results)
    down, up = _local_copy_gbps(args.device, min(block_bytes, 1 << 30))
    print(f"\nlibremote oversubscription proof: {args.clients} clients x {blocks} blocks of "
          f"{block_bytes / (1 << 30):.2f} GiB on {args.device}")
    print(f"live tensors held: {total / (1 << 30):.1f} GiB; device budget "
          f"{(device.get('device_budget') or 0) / (1 << 30):.1f} GiB; host spill limit "
          f"{(device.get('host_spill_limit') or 0) / (1 << 30):.1f} GiB")
    for index, (fill, result) in enumerate(zip(fills, results)):
        status = "all blocks equal" if not result["mismatched"] else f"MISMATCHED blocks {result['mismatched']}"
        print(f"  client {index}: fill {fill['filled']:.1f} s, check {result['check_s']:.1f} s: {status}")
    print(f"wall: fill {fill_wall:.1f} s, check {check_wall:.1f} s")
    evict_gbps = device["bytes_evicted"] / device["evict_seconds"] / 1e9 if device.get("evict_seconds") else 0.0
    restore_gbps = device["bytes_restored"] / device["restore_seconds"] / 1e9 if device.get("restore_seconds") else 0.0
    print(f"spills {device.get('evictions', 0)} ({device.get('bytes_evicted', 0) / (1 << 30):.1f} GiB) at "
          f"{evict_gbps:.2f} GB/s vs {down:.2f} GB/s plain device->host copy ({evict_gbps / down:.2f}x)")
    print(f"restores {device.get('restores', 0)} ({device.get('bytes_restored', 0) / (1 << 30):.1f} GiB) at "
          f"{restore_gbps:.2f} GB/s vs {up:.2f} GB/s plain host->device copy ({restore_gbps / up:.2f}x)")
    if any(r["mismatched"] for r in results):
        raise SystemExit("FAILED: some blocks did not survive spilling")


def _line(client: subprocess.Popen) -> str:
    line = client.stdout.readline()
    if not line:
        raise SystemExit(f"client exited early (code {client.wait()})")
    return line


if __name__ == "__main__":
    main()
