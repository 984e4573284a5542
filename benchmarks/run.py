"""libremote's benchmarks: every figure beside a reference measured in the same run, as a ratio.

    python benchmarks/run.py                  # daemon on the CPU backend, CI-sized workloads
    python benchmarks/run.py --device cuda --size full    # on a GPU server, realistic sizes
    python benchmarks/run.py --graph-compiler inductor    # graph mode compiled on the daemon

References: a raw pyzmq DEALER/ROUTER round trip and transfer between two processes (transport),
and local torch on the daemon's device in a process without libremote (compute). See
benchmarks/README.md for recorded figures and what they mean.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.raw_zmq import RawPeer  # noqa: E402
from benchmarks.workloads import training_kinds  # noqa: E402


def _free_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.pop("LIBREMOTE_SERVER", None)
    return env


def _measure(mode: str, extra: list[str]) -> dict:
    output = subprocess.run(
        [sys.executable, "-m", "benchmarks.measure", mode, *extra],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=3600,
    )
    if output.returncode != 0:
        raise SystemExit(f"benchmark process ({mode}) failed:\n{output.stderr}")
    return json.loads(output.stdout.strip().splitlines()[-1])


def _start_daemon(address: str, device: str, extra: list[str] = ()) -> subprocess.Popen:
    daemon = subprocess.Popen(
        [sys.executable, "-m", "libremote_server", "--listen", address, "--device", device, "--log-level", "WARNING",
         *extra],
        cwd=REPO, env=_env(),
    )
    time.sleep(0.5)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until the port accepts connections
        with socket.socket() as sock:
            host, port = address.rsplit("//", 1)[1].rsplit(":", 1)
            if sock.connect_ex((host, int(port))) == 0:
                return daemon
        time.sleep(0.2)
    daemon.kill()
    raise SystemExit("daemon did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="the daemon's device (cpu, cuda, auto)")
    parser.add_argument("--size", default="ci", choices=["ci", "full"], help="workload sizes")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--kinds", help="comma-separated training workloads (default: all of --size)")
    parser.add_argument("--json", action="store_true", help="print the raw figures as JSON too")
    parser.add_argument("--graph-compiler", choices=["none", "inductor"], default="none",
                        help="the daemon's --graph-compiler; with inductor, local torch.compile is a reference too")
    args = parser.parse_args()
    inductor = args.graph_compiler == "inductor"
    common = ["--size", args.size, "--steps", str(args.steps), *(["--kinds", args.kinds] if args.kinds else [])]

    peer = RawPeer(_free_address())
    raw = {"round_trip_us": peer.round_trip_us(),
           "upload_gbps": peer.upload_gbps(64 << 20), "download_gbps": peer.download_gbps(64 << 20)}
    peer.close()

    local_device = "cuda" if args.device.startswith("cuda") else args.device
    local = _measure("local", ["--device", local_device, *common, *(["--inductor"] if inductor else [])])
    address = _free_address()
    # No session quota: this measures speed, and GPT-2 at 8 x 512 needs more than the default 8 GiB.
    daemon = _start_daemon(address, args.device, ["--memory-quota", "1TiB", "--graph-compiler", args.graph_compiler])
    try:
        remote = _measure("remote", ["--server", address, *common])
    finally:
        daemon.terminate()
        daemon.wait(30)

    rows = [
        ("sync round trip x.sum().item() (us)", remote["sync_round_trip_us"], raw["round_trip_us"], "raw zmq round trip", "<= 1.5x"),
        ("client cost per streamed op (us)", remote["client_us_per_op"], remote["dispatch_floor_us_per_op"],
         "bare tensor subclass", "<= 15 us"),
        ("daemon cost per op (us)", remote["daemon_us_per_op"], None, "", ""),
        ("chain x*a+b ops/s", remote["chain_ops_per_s"], local["chain_ops_per_s"], "local eager", ""),
        ("upload 64 MiB (GB/s)", remote["upload_gbps"], raw["upload_gbps"], "raw zmq send", ">= 0.8x"),
        ("download 64 MiB (GB/s)", remote["download_gbps"], raw["download_gbps"], "raw zmq recv", ">= 0.8x"),
    ]
    for kind in args.kinds.split(",") if args.kinds else training_kinds(args.size):
        rows.append((f"{kind} training steps/s", remote[f"{kind}_steps_per_s"], local[f"{kind}_steps_per_s"], "local eager", ""))
        graph_mode = f"{kind} training, graph mode{' (inductor)' if inductor else ''}"
        rows.append((graph_mode, remote[f"{kind}_graph_steps_per_s"], local[f"{kind}_steps_per_s"], "local eager", ""))
        if inductor:
            rows.append((graph_mode, remote[f"{kind}_graph_steps_per_s"], local[f"{kind}_inductor_steps_per_s"],
                         "local torch.compile", ""))
        rows.append((f"{kind} training, captured step", remote[f"{kind}_captured_steps_per_s"],
                     local[f"{kind}_steps_per_s"], "local eager", ""))

    print(f"\nlibremote benchmarks on {platform.node()} ({os.cpu_count()} cores), daemon device: "
          f"{remote['daemon_device']}, workloads: {args.size}")
    print(f"{'figure':40} {'libremote':>12} {'reference':>12} {'ratio':>8}  reference / target")
    for name, value, reference, what, target in rows:
        ratio = f"{value / reference:8.2f}" if reference else " " * 8
        ref = f"{reference:12.2f}" if reference else " " * 12
        print(f"{name:40} {value:12.2f} {ref} {ratio}  {what}{' / ' + target if target else ''}")
    print("\nwhere a training step's time goes through libremote (ms per step): wall time, the client's "
          "host time to issue it, the daemon's host time to run it")
    print(f"{'workload':28} {'wall':>8} {'client':>8} {'daemon':>8}")
    for kind in args.kinds.split(",") if args.kinds else training_kinds(args.size):
        for mode, figures in remote[f"{kind}_profile_ms"].items():
            print(f"{kind + ', ' + mode:28} {figures['wall_ms']:8.1f} {figures['client_ms']:8.1f} "
                  f"{figures['daemon_host_ms']:8.1f}")
    if inductor:
        print("\ndaemon-side compiles (inductor, in the background while the first calls ran interpreted):")
        for kind in args.kinds.split(",") if args.kinds else training_kinds(args.size):
            print(f"{kind:28} {remote[f'{kind}_graphs_compiled']:3d} graphs in {remote[f'{kind}_graph_compile_s']:6.1f} s")
    if args.json:
        print(json.dumps({"raw": raw, "local": local, "remote": remote}))


if __name__ == "__main__":
    main()
