#!/usr/bin/env python
"""Long-running fuzzing of the allowed ops: every overload the op rules allow, called with hostile
tensors (tests/hostile_ops.py) by a tenant "fuzz" of a real daemon, while another tenant ("alice")
holds a secret in her own worker.

The CI-sized variant is tests/test_hostile_ops.py. Each call ends in one of: succeeded, an error
(the kernel's own check, a rule's refusal, out of memory), or the fuzzing tenant's worker lost (a
crash, or --op-time-limit: a kernel that hangs, as heap corruption often ends). The summary counts
them and lists the lost workers per op, each with an example call (replayed alone in a fresh
worker, to tell a kernel's own crash from heap corruption an earlier call left behind). Each
crash is a kernel that trusts its arguments: give it an op rule (server/worker/call_checks.py)
and a test (tests/test_findings.py).

It fails (exit 1) only if the front dies, a call gets no answer at all, or alice's worker is
replaced, her secret changed or her results are not exact: crashes of the fuzzing tenant's own
worker are what it looks for.

    python scripts/fuzz_ops.py                         # 1,000,000 calls, with the op rules
    python scripts/fuzz_ops.py --ops 20000 --seed 3
    python scripts/fuzz_ops.py --rules-off             # the daemon runs --unsafe-no-op-rules
    python scripts/fuzz_ops.py --malloc-check          # glibc's checking malloc: heap overruns
                                                       # abort at the call that made them (slower)
    python scripts/fuzz_ops.py --only 'ctc|segment'    # overloads whose names match
    python scripts/fuzz_ops.py --device cuda           # against a daemon on the GPU
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import hostile_ops  # noqa: E402
from conftest import Daemon  # noqa: E402

TENANTS = """
[tenants.alice]
token = "alice-secret"
memory_quota = "256MiB"

[tenants.fuzz]
token = "fuzz-secret"
memory_quota = "512MiB"
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", type=float, default=1e6, help="calls to make (default 1e6)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rules-off", action="store_true",
                        help="run the daemon with --unsafe-no-op-rules (tests only): what the rules keep out")
    parser.add_argument("--malloc-check", action="store_true",
                        help="run the daemon under glibc's checking malloc (libc_malloc_debug.so): a heap overrun "
                        "aborts at the call that made it instead of corrupting the heap for a later one")
    parser.add_argument("--only", metavar="REGEX", help="call only the overloads whose names match")
    parser.add_argument("--op-time-limit", type=float, default=10.0,
                        help="the daemon's --op-time-limit in seconds (default 10): a hanging kernel ends its worker")
    parser.add_argument("--no-replay", action="store_true", help="do not replay calls that lost their worker")
    parser.add_argument("--report", metavar="FILE", help="write every lost worker's call and reason there (JSON)")
    parser.add_argument("--device", default="cpu", help="the daemon's --device (default cpu; cuda on a GPU host)")
    args = parser.parse_args()
    total = int(args.ops)

    names = hostile_ops.allowed_overloads()
    if args.only:
        names = [name for name in names if re.search(args.only, name)]
    if not names:
        print(f"no allowed overload matches {args.only!r}")
        return 2
    if args.malloc_check:  # (inherited by the daemon, its zygote and its workers)
        os.environ.update(LD_PRELOAD="libc_malloc_debug.so.0", GLIBC_TUNABLES="glibc.malloc.check=3")
    tenants = Path(tempfile.mkdtemp()) / "tenants.toml"
    tenants.write_text(TENANTS)
    # The bystander sends nothing while the campaign runs: its session must outlive the heartbeat timeout.
    options = ["--tenants", str(tenants), "--op-time-limit", f"{args.op_time_limit:g}", "--heartbeat-timeout", "86400"]
    server = Daemon(*options, *(["--unsafe-no-op-rules"] if args.rules_off else []), device=args.device)
    print(f"{len(names)} overloads, {total} calls, seed {args.seed}, op rules {'OFF' if args.rules_off else 'on'}"
          f"{', checking malloc' if args.malloc_check else ''}; daemon log {server.log_path}", flush=True)
    try:
        alice = hostile_ops.Bystander(server.address, "alice", "alice-secret")
        fuzzer = hostile_ops.OpFuzzer(server.address, "fuzz", "fuzz-secret", answer_wait_s=args.op_time_limit + 30)
        started = time.monotonic()
        tally = hostile_ops.campaign(fuzzer, hostile_ops.HostileCalls(args.seed, names), total,
                                     replay=not args.no_replay, report_every_s=30, stop=server.process.poll)
        elapsed = time.monotonic() - started
        print(f"\n{tally.total} calls in {elapsed:.0f} s ({tally.total / elapsed:.0f}/s), "
              f"{fuzzer.sessions} sessions in {len(fuzzer.worker_pids)} workers of tenant fuzz")
        print(tally.summary())
        if args.report:
            Path(args.report).write_text(json.dumps({"counts": dict(tally.counts), "lost": tally.deaths,
                                                     "replayed": tally.replayed}, indent=1))
        failures = []
        if server.process.poll() is not None:
            failures.append(f"the front died\n{server.log()[-4000:]}")
        else:
            failures += alice.problems()
        if tally.counts[hostile_ops.NO_ANSWER]:
            failures.append(f"{tally.counts[hostile_ops.NO_ANSWER]} calls got no answer (neither a reply nor the front's word)")
        for failure in failures:
            print("FAIL:", failure)
        if not failures:
            print("OK: the front served throughout; alice's worker, secret and results are unchanged")
        return 1 if failures else 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
