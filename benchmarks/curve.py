"""What CURVE (``libremote-server --auth-keys``) costs: round trip and 64 MiB transfers, encrypted
beside plain TCP in the same run, as ratios.

    python benchmarks/curve.py                          # daemons on the CPU backend
    python benchmarks/curve.py --device cuda            # on a GPU server
    python benchmarks/curve.py --stripes 0,2,4,8 --rounds 5

Two pairs of figures: raw pyzmq DEALER/ROUTER between two processes (the transport alone), and
libremote end to end (a client in its own process against a daemon started with and without
``--auth-keys``; ``x.sum().item()`` round trips, ``host.cuda()`` / ``.cpu()`` of 64 MiB). CURVE
encrypts every byte (XSalsa20-Poly1305 in libsodium or libzmq's tweetnacl), so it is
bandwidth that pays; a round trip pays two small encryptions. One connection is encrypted by one
ZeroMQ I/O thread, so the client stripes large frames over LIBREMOTE_STRIPES more connections
(libremote/client/stripes.py): the figures are given per stripe count, each against plain TCP
measured in the same round. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
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
    from libremote.client import runtime

    libremote.connect(address)
    x = torch.ones(1024, device="cuda")
    results = {"round_trip_us": best_block_us(lambda: x.sum().item())}
    results.update(transfer_gbps(TRANSFER_BYTES))
    results["stripes"], results["striped_sent"], results["striped_received"] = \
        runtime.sessions()[0].connection.striped_bytes()
    libremote.disconnect()
    return results


def measure(address: str, env: dict) -> dict:
    """One client process against the daemon at ``address``: its figures."""
    output = subprocess.run([sys.executable, "-m", "benchmarks.curve", "--client", address],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if output.returncode != 0:
        raise SystemExit(f"benchmark client failed:\n{output.stderr}")
    return json.loads(output.stdout.strip().splitlines()[-1])


def curve_env(keys_dir: Path, stripes: int) -> dict:
    return _env() | {"LIBREMOTE_CLIENT_KEY": str(keys_dir.parent / "bench.key_secret"),
                     "LIBREMOTE_SERVER_KEY": str(keys_dir / "server.key"), "LIBREMOTE_STRIPES": str(stripes)}


def make_keys(folder: Path) -> Path:
    """A daemon key folder with one tenant key ("bench"), the client's pair beside it."""
    from libremote_wire import curve_keys

    keys_dir = folder / "daemon"
    curve_keys.generate(keys_dir, "server")
    public, _ = curve_keys.generate(folder, "bench")
    (keys_dir / "bench.key").write_bytes(public.read_bytes())
    return keys_dir


def rounds(device: str, stripe_counts: list[int], count: int) -> list[dict]:
    """``count`` rounds; in each, every configuration once (plain TCP, then CURVE with each stripe
    count), the order reversed every other round, so the machine's noise falls on all alike."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        keys_dir = make_keys(Path(tmp))
        plain_address, curve_address = _free_address(), _free_address()
        daemons = [_start_daemon(plain_address, device), _start_daemon(curve_address, device, ["--auth-keys", str(keys_dir)])]
        try:
            configurations = [("plain", plain_address, _env())] + [
                (f"curve {n} stripes", curve_address, curve_env(keys_dir, n)) for n in stripe_counts]
            for number in range(count):
                figures = {"raw plain": raw_figures(curve=False), "raw curve": raw_figures(curve=True)}
                order = configurations if number % 2 == 0 else configurations[::-1]
                for name, address, env in order:
                    figures[name] = measure(address, env)
                results.append(figures)
                print(f"round {number + 1}/{count}: " + ", ".join(
                    f"{name} {f['upload_gbps']:.2f}/{f['download_gbps']:.2f} GB/s {f['round_trip_us']:.0f} us"
                    for name, f in figures.items()), file=sys.stderr)
        finally:
            for daemon in daemons:
                daemon.terminate()
                daemon.wait(30)
    return results


def median_table(results: list[dict], stripe_counts: list[int]) -> list[str]:
    """Medians over the rounds of each figure and of each round's curve/plain ratio."""
    lines = [f"{'':<44}{'plain':>10}{'curve':>10}{'curve/plain':>13}"]
    pairs = [("raw", "raw plain", "raw curve")] + [
        (f"libremote {n} stripe{'s' if n != 1 else ''}", "plain", f"curve {n} stripes") for n in stripe_counts]
    for label, plain_key, curve_key in pairs:
        for key, what in (("round_trip_us", "round trip (us)"), ("upload_gbps", "upload 64 MiB (GB/s)"),
                          ("download_gbps", "download 64 MiB (GB/s)")):
            plain = statistics.median(r[plain_key][key] for r in results)
            curve = statistics.median(r[curve_key][key] for r in results)
            ratio = statistics.median(r[curve_key][key] / r[plain_key][key] for r in results)
            lines.append(f"{label + ' ' + what:<44}{plain:>10.2f}{curve:>10.2f}{ratio:>12.2f}x")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="the daemons' device (cpu, cuda, auto)")
    parser.add_argument("--stripes", default="0,1,2,4",
                        help="CURVE stripe counts to measure (LIBREMOTE_STRIPES; 0: one connection, as before)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are reported")
    parser.add_argument("--client", metavar="ADDRESS", help=argparse.SUPPRESS)  # (the client process)
    parser.add_argument("--json", action="store_true", help="print the raw figures as JSON too")
    args = parser.parse_args()
    if args.client:
        print(json.dumps(client_figures(args.client)))
        return
    stripe_counts = [int(n) for n in args.stripes.split(",")]
    results = rounds(args.device, stripe_counts, args.rounds)
    print(f"\nCURVE vs plain TCP on {platform.node()} ({os.cpu_count()} cores), daemon device {args.device}, "
          f"loopback; medians of {args.rounds} alternating rounds (ratio: the median of each round's ratio); "
          "a time ratio above 1 or a bandwidth ratio below 1 is CURVE's cost\n")
    print("\n".join(median_table(results, stripe_counts)))
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
