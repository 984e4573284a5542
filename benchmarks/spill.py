"""Memory oversubscription: training through spills, spill bandwidth, resume latency.

    python benchmarks/spill.py                    # CPU backend (the budget is --device-memory)
    python benchmarks/spill.py --device cuda      # on a GPU server

1. A training loop whose memory is 1.0x, 1.5x and 2.0x the device budget, in steps/s, beside
   the same loop on an unconstrained daemon (anchors from the literature: SwapAdvisor keeps
   53-99% of throughput at large factors; vDNN loses 18% at ~2.3x).
2. Spill and restore bandwidth for one 64 MiB storage (the daemon's own timing, best of 10
   spills and restores), beside a plain copy of the same bytes between device and host memory
   measured in this process (pinned on a GPU, best of 5).
3. Resume latency: the time to the first result for a session whose data was all spilled while
   it was idle (best of 3), beside the same read when the data is resident.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.run import _env, _free_address, _start_daemon  # noqa: E402

CLIENT = r"""
import json, os, sys, time, torch, libremote
from torch import nn
libremote.connect(os.environ["BENCH_SERVER"])
mode = sys.argv[1]
if mode == "train":
    width, steps, captured = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "captured"
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(6)], nn.Linear(width, 1)).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, capturable=captured)
    x, y = torch.randn(64, width, device="cuda"), torch.randn(64, 1, device="cuda")
    def step():
        loss = nn.functional.mse_loss(model(x), y); opt.zero_grad(set_to_none=not captured); loss.backward(); opt.step(); return loss
    step().item()
    if captured:  # the whole step recorded once and replayed (libremote.capture_step)
        step = libremote.capture_step(step)
    step().item()
    before = libremote.memory_stats().get("device", {})
    start = time.perf_counter()
    for _ in range(steps): loss = step()
    loss.item()
    elapsed = time.perf_counter() - start
    stats = libremote.memory_stats()
    after = stats.get("device", {})
    per_step = {name: (after.get(key, 0) - before.get(key, 0)) / steps for name, key in (
        ("evicted_per_step", "bytes_evicted"), ("restored_per_step", "bytes_restored"),
        ("prefetched_per_step", "bytes_prefetched"), ("freed_spilled_per_step", "bytes_freed_while_spilled"),
        ("discarded_per_step", "bytes_discarded"))}
    print(json.dumps({"steps_per_s": steps / elapsed, "allocated": stats["allocated"], "spilled": stats["spilled"],
                      **per_step}))
else:  # bandwidth and resume, best of ROUNDS (one sample moved 5x from run to run on the 2-core VM)
    n, rounds = 64 << 20, 5
    def moved():
        device = libremote.memory_stats()["device"]
        return [device[key] for key in ("bytes_evicted", "evict_seconds", "bytes_restored", "restore_seconds")]
    def rate(before, after, at):
        return (after[at] - before[at]) / max(after[at + 1] - before[at + 1], 1e-9) / 1e9
    a = torch.empty(n, dtype=torch.uint8, device="cuda").fill_(1)
    b = torch.empty(n, dtype=torch.uint8, device="cuda").fill_(2); torch.cuda.synchronize()  # evicts a
    evict_gbps = restore_gbps = 0.0
    for _ in range(rounds):  # each touch of the spilled one restores it and evicts the other
        for tensor in (a, b):
            before = moved(); tensor.add_(1); torch.cuda.synchronize(); after = moved()
            evict_gbps, restore_gbps = max(evict_gbps, rate(before, after, 0)), max(restore_gbps, rate(before, after, 2))
    del b
    resume = resident_latency = float("inf")
    for _ in range(3):
        a.add_(1); torch.cuda.synchronize(); time.sleep(0.5)
        start = time.perf_counter()
        value = a[:1].item()  # a is resident: a plain first-op latency for comparison
        resident_latency = min(resident_latency, time.perf_counter() - start)
        c = torch.empty(n, dtype=torch.uint8, device="cuda").fill_(3); torch.cuda.synchronize()  # evicts a
        time.sleep(0.5)
        start = time.perf_counter()
        value = a[:1].item()  # a was spilled while idle: resume
        resume = min(resume, time.perf_counter() - start)
        del c
    print(json.dumps({"resume_s": resume, "resident_s": resident_latency, "bytes": n,
                      "evict_gbps": evict_gbps, "restore_gbps": restore_gbps}))
"""


def _client(address: str, *args: str) -> dict:
    import json

    out = subprocess.run([sys.executable, "-c", CLIENT, *args], cwd=REPO, env=_env() | {"BENCH_SERVER": address},
                         capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"benchmark client failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _with_daemon(device: str, flags: list[str], *args: str) -> dict:
    address = _free_address()
    daemon = _start_daemon(address, device, extra=flags)
    try:
        return _client(address, *args)
    finally:
        daemon.terminate()
        daemon.wait(30)


def _local_copy_gbps(device: str, nbytes: int) -> tuple[float, float]:
    """Host<->device copy rate of ``nbytes`` in this process: (to host, to device) GB/s."""
    import torch

    target = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    source = torch.ones(nbytes, dtype=torch.uint8, device=target)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=target.type == "cuda")
    best_down = best_up = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        host.copy_(source)
        if target.type == "cuda":
            torch.cuda.synchronize()
        best_down = min(best_down, time.perf_counter() - start)
        start = time.perf_counter()
        source.copy_(host)
        if target.type == "cuda":
            torch.cuda.synchronize()
        best_up = min(best_up, time.perf_counter() - start)
    return nbytes / best_down / 1e9, nbytes / best_up / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--width", type=int, default=768, help="MLP width (memory grows with its square)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--captured", action="store_true",
                        help="train with a captured step (libremote.capture_step) instead of eagerly")
    args = parser.parse_args()
    train = ["train", str(args.width), str(args.steps), "captured" if args.captured else "eager"]
    rows = []
    traffic = []

    free = _with_daemon(args.device, [], *train)
    working_set = free["allocated"]
    for factor in (1.0, 1.5, 2.0):
        budget = int(working_set / factor)
        result = _with_daemon(args.device, ["--device-memory", str(budget), "--host-spill", str(4 * working_set)], *train)
        rows.append((f"training, memory {factor:.1f}x the budget (steps/s)", result["steps_per_s"],
                     free["steps_per_s"], "unconstrained"))
        traffic.append((factor, result))

    n = 64 << 20
    measured = _with_daemon(args.device, ["--device-memory", str(n + (8 << 20)), "--host-spill", str(4 * n)], "bandwidth")
    down, up = _local_copy_gbps(args.device, n)
    rows.append(("spill to host, daemon-measured (GB/s)", measured["evict_gbps"], down, "device->host copy"))
    rows.append(("restore from host, daemon-measured (GB/s)", measured["restore_gbps"], up, "host->device copy"))
    rows.append(("resume latency of a spilled idle tensor (ms)", measured["resume_s"] * 1e3,
                 measured["resident_s"] * 1e3, "same read when resident"))

    print(f"\nlibremote oversubscription benchmark: daemon device {args.device}, {os.cpu_count()} cores, "
          f"working set {working_set / (1 << 20):.1f} MiB, training {'with a captured step' if args.captured else 'eagerly'}")
    print(f"{'figure':52} {'value':>10} {'reference':>10} {'ratio':>7}  reference")
    for name, value, reference, what in rows:
        print(f"{name:52} {value:10.3f} {reference:10.3f} {value / reference:7.2f}  {what}")
    print("\nspill traffic per training step (MiB): spilled to host / restored (of which prefetched ahead of use)"
          " / freed by the client while spilled / dead, dropped without a copy")
    for factor, result in traffic:
        print(f"  memory {factor:.1f}x the budget: {result['evicted_per_step'] / (1 << 20):8.1f} / "
              f"{result['restored_per_step'] / (1 << 20):8.1f} ({result['prefetched_per_step'] / (1 << 20):.1f}) / "
              f"{result['freed_spilled_per_step'] / (1 << 20):8.1f} / {result['discarded_per_step'] / (1 << 20):8.1f}")


if __name__ == "__main__":
    main()
