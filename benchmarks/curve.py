"""What CURVE (``libremote-server --auth-keys``) costs: round trip and 64 MiB transfers, encrypted
beside plain TCP in the same run, as ratios.

    python benchmarks/curve.py                  # daemons on the CPU backend
    python benchmarks/curve.py --device cuda    # on a GPU server

Two pairs of figures: raw pyzmq DEALER/ROUTER between two processes (the transport alone), and
libremote end to end (a client in its own process against a daemon started with and without
``--auth-keys``; ``x.sum().item()`` round trips, ``host.cuda()`` / ``.cpu()`` of 64 MiB). CURVE
encrypts every byte (XSalsa20-Poly1305 in libsodium or libzmq's tweetnacl), so it is
bandwidth that pays; a round trip pays two small encryptions. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.measure import transfer_gbps  # noqa: E402
from benchmarks.raw_zmq import RawPeer  # noqa: E402
from benchmarks.run import _env, _free_address, _start_daemon  # noqa: E402

TRANSFER_BYTES = 64 << 20


def raw_figures(curve: bool) -> dict:
    peer = RawPeer(_free_address(), curve=curve)
    try:
        return {"round_trip_us": peer.round_trip_us(), "upload_gbps": peer.upload_gbps(TRANSFER_BYTES),
                "download_gbps": peer.download_gbps(TRANSFER_BYTES)}
    finally:
        peer.close()


def client_figures(address: str) -> dict:
    """Run in the client process (``python -m benchmarks.curve --client ADDRESS``)."""
    import torch

    import libremote
    from benchmarks.timing import best_block_us

    libremote.connect(address)
    x = torch.ones(1024, device="cuda")
    results = {"round_trip_us": best_block_us(lambda: x.sum().item())}
    results.update(transfer_gbps(TRANSFER_BYTES))
    libremote.disconnect()
    return results


def libremote_figures(device: str, keys_dir: Path | None) -> dict:
    """Start a daemon (CURVE when ``keys_dir`` is given), measure from a client process."""
    address = _free_address()
    extra = ["--auth-keys", str(keys_dir)] if keys_dir else []
    env = _env()
    if keys_dir:
        env |= {"LIBREMOTE_CLIENT_KEY": str(keys_dir.parent / "bench.key_secret"),
                "LIBREMOTE_SERVER_KEY": str(keys_dir / "server.key")}
    daemon = _start_daemon(address, device, extra)
    try:
        output = subprocess.run([sys.executable, "-m", "benchmarks.curve", "--client", address],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    finally:
        daemon.terminate()
        daemon.wait(30)
    if output.returncode != 0:
        raise SystemExit(f"benchmark client failed:\n{output.stderr}")
    return json.loads(output.stdout.strip().splitlines()[-1])


def make_keys(folder: Path) -> Path:
    """A daemon key folder with one tenant key ("bench"), the client's pair beside it."""
    from libremote_wire import curve_keys

    keys_dir = folder / "daemon"
    curve_keys.generate(keys_dir, "server")
    public, _ = curve_keys.generate(folder, "bench")
    (keys_dir / "bench.key").write_bytes(public.read_bytes())
    return keys_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="the daemons' device (cpu, cuda, auto)")
    parser.add_argument("--client", metavar="ADDRESS", help=argparse.SUPPRESS)  # (the client process)
    parser.add_argument("--json", action="store_true", help="print the raw figures as JSON too")
    args = parser.parse_args()
    if args.client:
        print(json.dumps(client_figures(args.client)))
        return
    figures = {"raw plain": raw_figures(curve=False), "raw curve": raw_figures(curve=True)}
    with tempfile.TemporaryDirectory() as tmp:
        keys_dir = make_keys(Path(tmp))
        figures["libremote plain"] = libremote_figures(args.device, None)
        figures["libremote curve"] = libremote_figures(args.device, keys_dir)
    print(f"\nCURVE vs plain TCP on {platform.node()} ({os.cpu_count()} cores), daemon device {args.device}, "
          "loopback; curve/plain: a time ratio above 1 or a bandwidth ratio below 1 is CURVE's cost\n")
    print(f"{'':<34}{'plain':>12}{'curve':>12}{'curve/plain':>13}")
    for side in ("raw", "libremote"):
        plain, curve = figures[f"{side} plain"], figures[f"{side} curve"]
        for key, label in (("round_trip_us", "round trip (us)"), ("upload_gbps", "upload 64 MiB (GB/s)"),
                           ("download_gbps", "download 64 MiB (GB/s)")):
            print(f"{side + ' ' + label:<34}{plain[key]:>12.2f}{curve[key]:>12.2f}{curve[key] / plain[key]:>12.2f}x")
    if args.json:
        print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
