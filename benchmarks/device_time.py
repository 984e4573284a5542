"""Device time of one local training step (no libremote): the floor for any remote step.

    python benchmarks/device_time.py --kind gpt2-2x256      # on a GPU server

Sums the durations of the CUDA kernels and copies the profiler saw over a few steps. When this is
close to local eager's wall time per step, local eager is device-bound, and neither graph mode nor
captured steps can beat it by more than the launch gaps they remove.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.workloads import make_step  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="gpt2-2x256")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    step = make_step(args.kind, "cuda", "full")
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) / args.steps * 1e3
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    device_us = sum(event.self_device_time_total for event in profile.key_averages())
    print(f"{args.kind}: local eager {wall_ms:.1f} ms per step (wall), device busy {device_us / args.steps / 1e3:.1f} ms "
          f"per step ({device_us / args.steps / 1e3 / wall_ms:.0%} of it)")


if __name__ == "__main__":
    main()
