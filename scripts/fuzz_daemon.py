#!/usr/bin/env python
"""Long-running fuzzing of a real daemon: millions of hostile messages through a raw socket.

The CI-sized variant is tests/test_fuzz.py; this one runs the same vocabulary
(tests/fuzz_messages.py) for as long as you like and reports messages per second and the daemon's
resident memory before and after (a bound that leaks shows as growth). It fails (exit 1) if the
daemon dies, stops answering, or logs a failure of its own (a traceback), or if a real client's
results afterwards are not exact.

    python scripts/fuzz_daemon.py                   # 1,000,000 messages
    python scripts/fuzz_daemon.py --messages 5e6 --seed 7
    python scripts/fuzz_daemon.py --device cuda      # against a daemon on the GPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import torch  # noqa: E402

import fuzz_messages  # noqa: E402
from conftest import Daemon, client_connected_to  # noqa: E402

#: Messages sent between two markers (a batch whose reply says the daemon has caught up): few
#: enough that their replies fit the daemon's per-peer outbox and its stream window.
BURST = 50


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=float, default=1e6, help="hostile messages to send (default 1e6)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="the daemon's --device (default cpu; cuda on a GPU host)")
    args = parser.parse_args()
    total = int(args.messages)
    server = Daemon("--memory-quota", "64MiB", "--max-handles", "4096", device=args.device)
    try:
        fuzzer = fuzz_messages.FuzzingClient(server.address)
        generator = fuzz_messages.RandomMessages(args.seed)
        rss_before = rss_bytes(server.process.pid)
        started = last_report = time.perf_counter()
        sent = 0
        while sent < total:
            fuzzer.send(*(generator.message() for _ in range(BURST)))
            sent += BURST
            if server.process.poll() is not None:
                print(f"FAIL: the daemon died after {sent} messages\n{server.log()[-4000:]}")
                return 1
            if time.perf_counter() - last_report > 10:
                last_report = time.perf_counter()
                print(f"{sent} messages, {sent / (last_report - started):.0f}/s, "
                      f"daemon RSS {rss_bytes(server.process.pid) >> 20} MiB", flush=True)
        elapsed = time.perf_counter() - started
        rss_after = rss_bytes(server.process.pid)
        print(f"{sent} messages in {elapsed:.0f} s: {sent / elapsed:.0f} messages/s; {fuzzer.sessions} sessions")
        print(f"daemon RSS before {rss_before >> 20} MiB, after {rss_after >> 20} MiB")
        if "Traceback" in server.log():
            print(f"FAIL: the daemon logged a failure of its own\n{server.log()[-6000:]}")
            return 1
        with client_connected_to(server.address):
            a, b = torch.randn(64, 64), torch.randn(64, 64)
            if not torch.equal((a.to("cuda") @ b.to("cuda")).cpu(), a @ b):
                print("FAIL: a real client's results are not exact after fuzzing")
                return 1
        print("OK: the daemon survived, and a real client's results are exact")
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
