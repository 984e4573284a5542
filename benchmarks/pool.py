"""The daemon as a shared pool: throughput, fairness and priority under concurrent clients.

    python benchmarks/pool.py                     # CPU backend, CI-sized
    python benchmarks/pool.py --device cuda --seconds 20

Figures (each beside its reference from the same run):
1. N = 1, 2, 4, 8 clients training the same MLP on one device: aggregate steps/s vs one client
   alone, and Jain's fairness index over the clients' device time (equal weights; 1.0 = perfect).
2. Two tenants with weights 1 and 3: their device-time shares vs the 25% / 75% they are owed.
3. A high-priority client's step latency (p50, p99), alone and with 4 low-priority clients
   saturating the device.

Device time per session comes from the daemon (``libremote status --json``), which is what the
scheduler divides. On a small CPU-only machine the clients' own Python competes with the daemon
for cores, so a client may fail to keep work queued; the table says how many cores there were.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.run import _env, _free_address, _start_daemon  # noqa: E402

CLIENT = r"""
import json, os, sys, time, torch, libremote
from torch import nn
libremote.connect(os.environ["BENCH_SERVER"])
start_at, stop_at, mode = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
width = int(os.environ.get("BENCH_WIDTH", "1024"))
model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1)).cuda()
opt = torch.optim.SGD(model.parameters(), lr=1e-3)
x, y = torch.randn(256, width, device="cuda"), torch.randn(256, 1, device="cuda")
def step():
    loss = nn.functional.mse_loss(model(x), y); opt.zero_grad(); loss.backward(); opt.step(); return loss
step().item()
print(json.dumps({"ready": libremote.server_info()["session"]}), flush=True)
while time.time() < start_at: time.sleep(0.001)
steps, latencies = 0, []
while time.time() < stop_at:
    t = time.perf_counter()
    loss = step()
    if mode == "latency":
        loss.item(); latencies.append(time.perf_counter() - t)
    elif steps % 10 == 9:
        loss.item()  # keep a bounded amount of work in flight
    steps += 1
loss.item()
print(json.dumps({"steps": steps, "latencies": latencies, "finished": time.time() - start_at}), flush=True)
"""


ADMIN_TOKEN = "bench-admin"  # the whole pool's status (device time per session) needs the admin


def _status(address: str) -> dict:
    # In this process (no CLI subprocess importing torch during a measured window).
    from libremote_wire.cli import _ask
    from libremote_wire.messages import Msg

    return _ask(address, [Msg.STATUS, {"token": ADMIN_TOKEN}], 30)[1]


def _run_clients(address: str, specs: list[dict], seconds: float, slack: float = 8.0) -> tuple[list[dict], dict]:
    """Start one client per spec (env overrides, mode), run them together, return their reports
    and each session's device time from the daemon."""
    start_at = time.time() + slack + 2 * len(specs)
    stop_at = start_at + seconds
    processes = []
    for spec in specs:
        env = _env() | {"BENCH_SERVER": address} | spec.get("env", {})
        processes.append(subprocess.Popen(
            [sys.executable, "-c", CLIENT, str(start_at), str(stop_at), spec.get("mode", "throughput")],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    sessions = [json.loads(p.stdout.readline())["ready"] for p in processes]
    if time.time() > start_at:
        raise SystemExit("the clients took too long to start; the measured window would be wrong "
                         "(a loaded machine: raise --start-slack)")
    while time.time() < start_at:
        time.sleep(0.01)
    before = {s["session"]: s["device_time_s"] for s in _status(address)["sessions"]}
    while time.time() < stop_at:
        time.sleep(0.01)
    after = {s["session"]: s["device_time_s"] for s in _status(address)["sessions"]}
    reports = []
    for process, session in zip(processes, sessions):
        out, err = process.communicate(timeout=120)
        if process.returncode != 0:
            raise SystemExit(f"a benchmark client failed:\n{err}")
        report = json.loads(out.strip().splitlines()[-1])
        report["device_time_s"] = after.get(session, 0.0) - before.get(session, 0.0)
        reports.append(report)
    return reports, {"seconds": seconds}


def jain(values: list[float]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values)) if any(values) else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--clients", default="1,2,4,8")
    parser.add_argument("--start-slack", type=float, default=8.0,
                        help="seconds (plus 2 per client) the clients get to start before the measured window")
    args = parser.parse_args()
    rows = []

    with tempfile.TemporaryDirectory() as tmp:
        tenants = Path(tmp) / "tenants.toml"
        tenants.write_text(f'[admin]\ntoken = "{ADMIN_TOKEN}"\n'
                           '[tenants.light]\ntoken = "l"\nweight = 1\npriority = "high"\n'
                           '[tenants.heavy]\ntoken = "h"\nweight = 3\npriority = "high"\n'
                           '[tenants.batch]\ntoken = "b"\nweight = 1\npriority = "low"\n')
        address = _free_address()
        daemon = _start_daemon(address, args.device, extra=["--tenants", str(tenants)])
        try:
            light = {"LIBREMOTE_TENANT": "light", "LIBREMOTE_TOKEN": "l"}
            alone = None
            for count in [int(n) for n in args.clients.split(",")]:
                reports, _ = _run_clients(address, [{"env": light}] * count, args.seconds, args.start_slack)
                # Steps over the time until the last one finished (work queued at the end counts).
                total = sum(r["steps"] for r in reports) / max(r["finished"] for r in reports)
                alone = alone or total
                fairness = jain([r["device_time_s"] for r in reports])
                rows.append((f"{count} clients: aggregate steps/s", total, alone, "1 client alone"))
                rows.append((f"{count} clients: Jain's fairness (device time)", fairness, 1.0, "perfect"))

            reports, _ = _run_clients(address, [{"env": light}, {"env": {"LIBREMOTE_TENANT": "heavy", "LIBREMOTE_TOKEN": "h"}}],
                                      args.seconds, args.start_slack)
            total = sum(r["device_time_s"] for r in reports) or 1.0
            rows.append(("weight 1 tenant: share of device time", reports[0]["device_time_s"] / total, 0.25, "owed"))
            rows.append(("weight 3 tenant: share of device time", reports[1]["device_time_s"] / total, 0.75, "owed"))

            high = {"env": light | {"LIBREMOTE_PRIORITY": "high"}, "mode": "latency"}
            low = {"env": {"LIBREMOTE_TENANT": "batch", "LIBREMOTE_TOKEN": "b", "LIBREMOTE_PRIORITY": "low"}}
            alone_report, _ = _run_clients(address, [high], args.seconds, args.start_slack)
            busy_report, _ = _run_clients(address, [high] + [low] * 4, args.seconds, args.start_slack)
            for name, q in (("p50", 0.5), ("p99", 0.99)):
                def pick(latencies: list[float], q: float = q) -> float:
                    ordered = sorted(latencies)
                    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3
                rows.append((f"high-priority step latency {name} (ms)", pick(busy_report[0]["latencies"]),
                             pick(alone_report[0]["latencies"]), "alone"))
        finally:
            daemon.terminate()
            daemon.wait(30)

    print(f"\nlibremote pool benchmark: daemon device {args.device}, {os.cpu_count()} cores, {args.seconds:g} s per run")
    print(f"{'figure':48} {'value':>10} {'reference':>10} {'ratio':>8}  reference")
    for name, value, reference, what in rows:
        print(f"{name:48} {value:10.3f} {reference:10.3f} {value / reference if reference else 0:8.2f}  {what}")


if __name__ == "__main__":
    main()
