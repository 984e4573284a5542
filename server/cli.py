"""``libremote-server``: run the daemon (also ``python -m libremote.server``)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Sequence

from . import devices
from .daemon import Daemon

DEFAULT_LISTEN = "tcp://127.0.0.1:7777"


def _size(text: str) -> int:
    """Parse ``8GiB``, ``512MiB``, ``1.5GB`` or a plain byte count."""
    units = {"": 1, "b": 1, "k": 1 << 10, "kb": 10**3, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6,
             "mib": 1 << 20, "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tb": 10**12,
             "tib": 1 << 40}
    stripped = text.strip().lower()
    number = stripped.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = stripped[len(number):].strip()
    if unit not in units:
        raise argparse.ArgumentTypeError(f"unknown size unit in {text!r}")
    try:
        return int(float(number) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="libremote-server",
        description="Serve this machine's accelerator (or CPU) to libremote clients.",
    )
    parser.add_argument(
        "--listen", default=DEFAULT_LISTEN,
        help=f"ZeroMQ address to bind (default {DEFAULT_LISTEN}; port 0 picks a free port). "
        "Binding a non-loopback address exposes the daemon to that network: it has no "
        "authentication of its own yet, so keep it on a trusted network.",
    )
    parser.add_argument(
        "--device", default="auto",
        help="auto (the best accelerator torch sees, else the CPU), cpu, cuda, cuda:N, or any "
        "torch accelerator type (default auto)",
    )
    parser.add_argument(
        "--max-message-size", type=_size, default=16 << 30, metavar="SIZE",
        help="largest message frame accepted, e.g. 4GiB (default 16GiB); larger ones disconnect the peer",
    )
    parser.add_argument(
        "--heartbeat", type=float, default=2.0, metavar="SECONDS",
        help="how often clients must show they are alive (default 2 s)",
    )
    parser.add_argument(
        "--heartbeat-timeout", type=float, default=10.0, metavar="SECONDS",
        help="a client silent this long is presumed dead and its session and memory are reclaimed (default 10 s)",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        device = devices.resolve_device(args.device)
    except ValueError as exc:
        print(f"libremote-server: {exc}", file=sys.stderr)
        return 2
    try:
        daemon = Daemon(
            args.listen, device, max_message_bytes=args.max_message_size,
            heartbeat_s=args.heartbeat, heartbeat_timeout_s=args.heartbeat_timeout,
        )
    except Exception as exc:  # zmq.ZMQError: address in use, bad endpoint
        print(f"libremote-server: cannot listen on {args.listen}: {exc}", file=sys.stderr)
        return 2

    def _on_signal(signum: int, _frame: object) -> None:
        logging.getLogger("libremote.server").info("received %s, stopping", signal.Signals(signum).name)
        daemon.stop()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    daemon.serve_forever()
    return 0
