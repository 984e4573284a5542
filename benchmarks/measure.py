"""One benchmark process: prints a JSON object of figures.

    python -m benchmarks.measure local  --device cpu          # references, without libremote
    python -m benchmarks.measure remote --server tcp://...     # the same through libremote

Local references run in a process that never imports libremote, so they pay none of its costs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from .timing import best_block_us
from .workloads import make_step, training_kinds


def _time_steps(step, steps: int, warmup: int, profile: dict | None = None) -> float:
    """Steps per second. With ``profile`` (a remote run): where a step's time goes, in ms per
    step: the client's host time to issue it, and the daemon's host time to execute it."""
    for _ in range(warmup):
        loss = step()
    float(loss)
    if profile is not None and _wait_for_daemon_compiles():
        float(step())  # the first run of the compiled code
    before = _daemon_host_s() if profile is not None else 0.0
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    issued = time.perf_counter()
    float(loss)  # one sync point at the end: the device finishes everything queued
    elapsed = time.perf_counter() - start
    if profile is not None:
        profile["client_ms"] = (issued - start) / steps * 1e3
        profile["daemon_host_ms"] = (_daemon_host_s() - before) / steps * 1e3
        profile["wall_ms"] = elapsed / steps * 1e3
    return steps / elapsed


def _wait_for_daemon_compiles() -> bool:
    """Wait until a daemon run with ``--graph-compiler inductor`` has compiled the graphs sent so
    far (it interprets them meanwhile); True if any compile was pending."""
    import libremote

    waited = False
    while libremote.session_stats().get("graph_compiles_pending", 0):
        waited = True
        time.sleep(0.2)
    return waited


def _daemon_host_s() -> float:
    import libremote

    return libremote.session_stats()["host_s"]


def _chain(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, count: int) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    for _ in range(count):
        x = x * a + b
    return x, time.perf_counter() - start


class _BareWrapper(torch.Tensor):
    """The least an op on a Python tensor subclass can cost: ``__torch_dispatch__`` only builds
    the result's wrapper. Timed in the client's own process (with libremote's torch-function
    mode on, as for remote tensors), it is the floor of intercepting ops in Python that the
    client's cost per op stands beside."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, like: torch.Tensor) -> _BareWrapper:
        return torch.Tensor._make_wrapper_subclass(cls, like.shape, dtype=like.dtype, device="meta")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        return cls(args[0])


def _dispatch_floor_us(count: int) -> float:
    """Microseconds per op of :func:`_chain` on :class:`_BareWrapper` tensors (best of five)."""
    x, a, b = (_BareWrapper(torch.empty(1024, device="meta")) for _ in range(3))
    _chain(x, a, b, 1000)
    return min(_chain(x, a, b, count)[1] for _ in range(5)) / (2 * count) * 1e6


def transfer_gbps(nbytes: int, repeats: int = 5) -> dict[str, float]:
    """Best of ``repeats`` host-to-device and device-to-host copies of ``nbytes`` through
    libremote (``upload_gbps``, ``download_gbps``)."""
    host = torch.randn(nbytes // 4)
    best_up = best_down = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        device_copy = host.cuda()
        torch.cuda.synchronize()
        best_up = min(best_up, time.perf_counter() - start)
        start = time.perf_counter()
        device_copy.cpu()
        best_down = min(best_down, time.perf_counter() - start)
        del device_copy
    return {"upload_gbps": nbytes / best_up / 1e9, "download_gbps": nbytes / best_down / 1e9}


def _kinds(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(args.kinds.split(",")) if args.kinds else training_kinds(args.size)


def local(args: argparse.Namespace) -> dict:
    device = args.device
    results: dict = {}
    x, a, b = (torch.randn(1024, device=device) for _ in range(3))
    _chain(x, a, b, 1000)
    best = float("inf")
    for _ in range(5):
        x, elapsed = _chain(x, a, b, args.chain)
        float(x.sum())
        best = min(best, elapsed)
    results["chain_ops_per_s"] = 2 * args.chain / best
    for kind in _kinds(args):
        results[f"{kind}_steps_per_s"] = _time_steps(make_step(kind, device, args.size), args.steps, 2)
        if args.inductor:
            results[f"{kind}_inductor_steps_per_s"] = _time_steps(make_step(kind, device, args.size, compiled=True),
                                                                  args.steps, 2)
    return results


def remote(args: argparse.Namespace) -> dict:
    import libremote

    libremote.connect(args.server)
    results: dict = {"daemon_device": torch.cuda.get_device_name()}
    x = torch.ones(1024, device="cuda")
    results["sync_round_trip_us"] = best_block_us(lambda: x.sum().item())

    x, a, b = (torch.randn(1024, device="cuda") for _ in range(3))
    _chain(x, a, b, 1000)
    float(x.sum())
    ops = 2 * args.chain
    best_client = best_total = best_daemon = float("inf")
    for _ in range(5):  # best of five: the two-core VM is noisy
        before = libremote.session_stats()
        x, client_elapsed = _chain(x, a, b, args.chain)
        drain_start = time.perf_counter()
        float(x.sum())
        after = libremote.session_stats()
        best_client = min(best_client, client_elapsed)
        best_total = min(best_total, client_elapsed + time.perf_counter() - drain_start)
        best_daemon = min(best_daemon, (after["busy_s"] - before["busy_s"]) / (after["ops"] - before["ops"]))
    results["client_us_per_op"] = best_client / ops * 1e6
    results["dispatch_floor_us_per_op"] = _dispatch_floor_us(args.chain)
    results["daemon_us_per_op"] = best_daemon * 1e6
    results["chain_ops_per_s"] = ops / best_total

    results.update(transfer_gbps(args.transfer_mib << 20))

    compiled_before = {"graphs_compiled": 0, "graph_compile_s": 0.0}
    for kind in _kinds(args):
        profiles: dict = {"eager": {}, "graph": {}, "captured": {}}
        results[f"{kind}_steps_per_s"] = _time_steps(make_step(kind, "cuda", args.size), args.steps, 2,
                                                     profiles["eager"])
        results[f"{kind}_graph_steps_per_s"] = _time_steps(make_step(kind, "cuda", args.size, compiled=True),
                                                           args.steps, 2, profiles["graph"])
        replay = libremote.capture_step(make_step(kind, "cuda", args.size, compiled=True, capturable=True))
        results[f"{kind}_captured_steps_per_s"] = _time_steps(replay, args.steps, 2, profiles["captured"])
        results[f"{kind}_profile_ms"] = profiles
        stats = libremote.session_stats()
        results[f"{kind}_cuda_graph_replays"] = stats.get("cuda_graph_replays", 0)
        results[f"{kind}_cuda_graph_interpreted"] = stats.get("cuda_graph_interpreted", {})
        # This workload's compiles on a --graph-compiler daemon (the session's counts are totals).
        for key in compiled_before:
            results[f"{kind}_{key}"] = stats.get(key, 0) - compiled_before[key]
            compiled_before[key] = stats.get(key, 0)
    libremote.disconnect()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["local", "remote"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--server")
    parser.add_argument("--size", default="ci", choices=["ci", "full"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--kinds", help="comma-separated training workloads (default: all of --size)")
    parser.add_argument("--chain", type=int, default=5000)
    parser.add_argument("--transfer-mib", type=int, default=64)
    parser.add_argument("--inductor", action="store_true", help="local: also time torch.compile (inductor)")
    args = parser.parse_args()
    results = local(args) if args.mode == "local" else remote(args)
    json.dump(results, sys.stdout)
    print()


if __name__ == "__main__":
    main()
