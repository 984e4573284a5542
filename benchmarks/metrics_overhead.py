"""What metrics and health sampling cost the op path (issue 22: within 2% per op).

    python benchmarks/metrics_overhead.py [--device cpu] [--rounds 8] [--chain 4000]

Two daemons run side by side in one run: one plain, one with ``--metrics-listen`` gathering its
workers' figures every 0.5 s (four times as often as by default), sampling health every second,
and scraped (``/metrics`` and ``/api/snapshot``) ten times a second by a thread of this script. One
client process alternates between them, round after round, and times a chain of ``x * a + b`` ops
(the per-op path) on each: the daemon's cost per op (its host time executing the session's
commands, ``session_stats()["busy_s"]`` over the ops run) and the client's wall time per op
through a final sync. Each figure is the best of its rounds, so the comparison is between the two
daemons' quietest moments on a shared machine; the ratio is metrics-on over metrics-off.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.pop("LIBREMOTE_SERVER", None)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def _daemon(device: str, extra: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    address = f"tcp://127.0.0.1:{_free_port()}"
    process = subprocess.Popen([sys.executable, "-m", "libremote_server", "--listen", address, "--device", device,
                                *extra], env=_env(), cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while "listening on" not in log.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the daemon did not start:\n{log.read_text()}")
        time.sleep(0.1)
    return process, address


CLIENT = """
    import json, sys, time, torch, libremote
    addresses, rounds, chain = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    results = {name: {"daemon_us": [], "wall_us": []} for name in addresses}

    def measure():
        x, a, b = (torch.randn(1024, device="cuda") for _ in range(3))
        for _ in range(200):
            x = x * a + b
        float(x.sum())
        before = libremote.session_stats()
        start = time.perf_counter()
        for _ in range(chain):
            x = x * a + b
        float(x.sum())
        wall = time.perf_counter() - start
        after = libremote.session_stats()
        ops = after["ops"] - before["ops"]
        return (after["busy_s"] - before["busy_s"]) / ops * 1e6, wall / (2 * chain) * 1e6

    for round_ in range(rounds):
        order = list(addresses.items()) if round_ % 2 == 0 else list(reversed(addresses.items()))
        for name, address in order:
            libremote.connect(address)
            daemon_us, wall_us = measure()
            libremote.disconnect()
            results[name]["daemon_us"].append(daemon_us)
            results[name]["wall_us"].append(wall_us)
    print(json.dumps(results))
"""


def _scrape(url: str, stop: threading.Event, counts: list[int]) -> None:
    while not stop.is_set():
        for path in ("/metrics", "/api/snapshot"):
            try:
                with urllib.request.urlopen(url + path, timeout=5) as response:
                    response.read()
                counts[0] += 1
            except OSError:
                pass
        stop.wait(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--chain", type=int, default=4000, help="x * a + b links per measurement (two ops each)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="libremote-bench-"))
    metrics_port = _free_port()
    plain, plain_address = _daemon(args.device, [], folder / "plain.log")
    observed, observed_address = _daemon(
        args.device, ["--metrics-listen", f"127.0.0.1:{metrics_port}", "--metrics-interval", "0.5",
                      "--health-interval", "1"], folder / "metrics.log")
    stop, counts = threading.Event(), [0]
    scraper = threading.Thread(target=_scrape, args=(f"http://127.0.0.1:{metrics_port}", stop, counts), daemon=True)
    scraper.start()
    try:
        addresses = {"metrics_off": plain_address, "metrics_on": observed_address}
        run = subprocess.run([sys.executable, "-c", textwrap.dedent(CLIENT), json.dumps(addresses), str(args.rounds),
                              str(args.chain)], env=_env(), cwd=REPO, capture_output=True, text=True, timeout=1800)
        if run.returncode != 0:
            raise SystemExit(f"the client failed:\n{run.stderr}")
        results = json.loads(run.stdout.strip().splitlines()[-1])
    finally:
        stop.set()
        for process in (plain, observed):
            process.terminate()
            process.wait(timeout=30)
    off, on = results["metrics_off"], results["metrics_on"]
    figures = {
        "daemon_us_per_op_off": min(off["daemon_us"]), "daemon_us_per_op_on": min(on["daemon_us"]),
        "wall_us_per_op_off": min(off["wall_us"]), "wall_us_per_op_on": min(on["wall_us"]),
        "scrapes": counts[0], "rounds": args.rounds, "ops_per_round": 2 * args.chain,
    }
    figures["daemon_ratio"] = figures["daemon_us_per_op_on"] / figures["daemon_us_per_op_off"]
    figures["wall_ratio"] = figures["wall_us_per_op_on"] / figures["wall_us_per_op_off"]
    if args.json:
        print(json.dumps({**figures, "rounds_detail": results}, indent=2))
        return
    print(f"{'figure':<34}{'metrics off':>14}{'metrics on':>14}{'ratio':>8}")
    print(f"{'daemon cost per op (us, best)':<34}{figures['daemon_us_per_op_off']:>14.2f}"
          f"{figures['daemon_us_per_op_on']:>14.2f}{figures['daemon_ratio']:>8.3f}")
    print(f"{'client wall time per op (us, best)':<34}{figures['wall_us_per_op_off']:>14.2f}"
          f"{figures['wall_us_per_op_on']:>14.2f}{figures['wall_ratio']:>8.3f}")
    print(f"({args.rounds} rounds of {2 * args.chain} ops on each daemon, alternating; {counts[0]} scrapes of the "
          f"metrics-on daemon meanwhile, its figures gathered every 0.5 s, health every 1 s)")


if __name__ == "__main__":
    main()
