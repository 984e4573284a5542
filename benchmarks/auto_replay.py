"""Repeated steps replayed without the program asking (``LIBREMOTE_AUTO_REPLAY``), beside op by op.

    python benchmarks/auto_replay.py [--device cpu] [--rounds 5] [--steps 20] [--kinds mlp,gpt]

One daemon; one client process alternates, round after round, between a session with the
feature off (every op streamed) and one with it on (after 3 alike steps each step is one
RUN_STEP), in alternating order, and times the same unmodified training loop in each: the
workloads of benchmarks/workloads.py, each step ending in ``loss.item()`` (the sync point that
splits the stream into steps). Local eager torch on the host (no libremote) runs in the same
rounds as the reference. Per mode: steps/s (wall), the client's CPU time per step (the whole
process: dispatch, encoding, the I/O threads), the bytes the client sent per step, and the
daemon's host time per step (``session_stats()["busy_s"]``). Each figure is the median of its
rounds; the ratios come from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.run import _env, _free_address  # noqa: E402
from benchmarks.workloads import make_step  # noqa: E402


def _small_step(kind: str, device: str) -> Any:
    """A host-bound step: a 6-layer MLP 64 wide on a batch of 16 (per-op costs dominate)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(6):
        layers += [nn.Linear(64, 64), nn.GELU()]
    model = nn.Sequential(*layers, nn.Linear(64, 10)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    data, target = torch.randn(16, 64).to(device), torch.randint(0, 10, (16,)).to(device)

    def step() -> Any:
        loss = nn.functional.cross_entropy(model(data), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss

    return step


def _local_round(kind: str, warmup: int, steps: int) -> dict[str, float]:
    """Local eager in a process without libremote (as benchmarks/run.py's reference): its
    torch threads neither share this process nor spin here after it ends."""
    code = (f"import json, sys; sys.argv = ['x', 'local', {kind!r}, '{warmup}', '{steps}']; "
            "from benchmarks.auto_replay import main; main()")
    env = _env()
    env.pop("BENCH_DAEMON", None)  # (that process measures; it starts nothing)
    output = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600, check=True)
    return dict(json.loads(output.stdout.strip().splitlines()[-1]))


def _round(kind: str, device: str, mode: str, warmup: int, steps: int) -> dict[str, float]:
    if mode == "local" and os.environ.get("BENCH_DAEMON"):
        return _local_round(kind, warmup, steps)
    libremote: Any = None
    if mode != "local":
        import libremote
        from libremote.client import runtime

        os.environ["LIBREMOTE_AUTO_REPLAY"] = "3" if mode == "replay" else "0"
        libremote.connect(os.environ["BENCH_DAEMON"])
    step = (_small_step if kind == "small" else make_step)(kind, "cpu" if mode == "local" else "cuda")
    for _ in range(warmup):
        float(step().item())
    session = runtime.current() if mode != "local" else None
    before = libremote.session_stats() if session is not None else {}
    sent = session.connection.bytes_sent if session is not None else 0
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(steps):
        float(step().item())
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    result = {"steps_per_s": steps / wall, "client_cpu_ms": 1e3 * cpu / steps}
    if session is not None:
        result["bytes_per_step"] = (session.connection.bytes_sent - sent) / steps
        after = libremote.session_stats()
        result["daemon_ms"] = 1e3 * (after["host_s"] - before["host_s"]) / steps
        result["replayed"] = after.get("auto_replay_steps", 0) - before.get("auto_replay_steps", 0)
        libremote.disconnect()
    return result


def main() -> None:
    if sys.argv[1:2] == ["local"]:  # (a local round's own process: see _local_round)
        kind, warmup, steps = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        os.environ.pop("BENCH_DAEMON", None)
        print(json.dumps(_round(kind, "cpu", "local", warmup, steps)))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--kinds", default="small,mlp,gpt", help="small (host-bound), and benchmarks/workloads.py's")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch's threads in every process (OMP_NUM_THREADS): 1 on a small shared machine, "
                             "where a parallel region's barrier waits for a descheduled thread")
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # (the daemon's and the local rounds' processes)
        import torch

        torch.set_num_threads(args.threads)
    address = _free_address()
    daemon = subprocess.Popen([sys.executable, "-m", "libremote_server", "--listen", address, "--device", args.device,
                               "--log-level", "WARNING"], cwd=REPO, env=_env())
    time.sleep(1.5)
    os.environ["BENCH_DAEMON"] = address
    try:
        report = {}
        for kind in args.kinds.split(","):
            rounds: dict[str, list[dict[str, float]]] = {"op_by_op": [], "replay": [], "local": []}
            for index in range(args.rounds):
                order = ["op_by_op", "replay", "local"] if index % 2 == 0 else ["replay", "op_by_op", "local"]
                for mode in order:
                    rounds[mode].append(_round(kind, args.device, mode, args.warmup, args.steps))
            medians = {mode: {key: statistics.median(r[key] for r in results) for key in results[0]}
                       for mode, results in rounds.items()}
            medians["ratios"] = {
                "replay_over_op_by_op": medians["replay"]["steps_per_s"] / medians["op_by_op"]["steps_per_s"],
                "replay_over_local": medians["replay"]["steps_per_s"] / medians["local"]["steps_per_s"],
                "op_by_op_over_local": medians["op_by_op"]["steps_per_s"] / medians["local"]["steps_per_s"],
                "client_cpu_replay_over_op_by_op": medians["replay"]["client_cpu_ms"] / medians["op_by_op"]["client_cpu_ms"],
            }
            report[kind] = medians
            print(json.dumps({kind: medians}), flush=True)
    finally:
        daemon.terminate()
        daemon.wait(timeout=15)


if __name__ == "__main__":
    main()
