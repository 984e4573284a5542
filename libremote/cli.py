"""``libremote``: look at and steer a running daemon.

    libremote status --server tcp://gpu01:7777 [--json]
    libremote admin --server tcp://gpu01:7777 --session ab12cd34ef56 --memory-quota 16GiB
    libremote admin --server tcp://gpu01:7777 --tenant research --weight 2 --priority high

``status`` prints the pool like ``nvidia-smi``: devices (model, memory used/total, utilization)
and sessions (tenant, priority, weight, memory, ops, device time). ``admin`` changes a session's
or a tenant's quota, weight or priority on the live daemon, effective at once; it needs the
daemon's admin token (``--token`` or ``LIBREMOTE_ADMIN_TOKEN``) unless run on the daemon's host
of a daemon that has none.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from typing import Any, Sequence

import zmq

from . import protocol
from .protocol import Msg


def _ask(address: str, message: list[Any], timeout_s: float) -> list[Any]:
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, secrets.token_bytes(16))
    try:
        sock.connect(address)
        sock.send(protocol.packb(message))
        if not sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            raise SystemExit(f"libremote: no daemon answered at {address} within {timeout_s:g} s")
        return protocol.unpackb(sock.recv())
    finally:
        sock.close(0)
        context.term()


def query_status(address: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """The daemon's status report (what ``libremote status --json`` prints), as a dict."""
    reply = _ask(address, [Msg.STATUS], timeout_s)
    if reply[0] != Msg.STATUS:
        raise SystemExit(f"libremote: unexpected answer {reply!r:.200}")
    return reply[1]


def _size(nbytes: float) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} B"


def _residency_line(index: int, r: dict[str, Any]) -> str:
    """One device's oversubscription figures: what is where now, and the traffic so far."""
    budget = "no set budget" if r.get("device_budget") is None else f"budget {_size(r['device_budget'])}"
    return (f"dev {index}: {_size(r['resident_bytes'])} resident ({budget}), {_size(r['spilled_bytes'])} spilled to "
            f"host (limit {_size(r['host_spill_limit'])}); since start {_size(r['bytes_evicted'])} spilled, "
            f"{_size(r['bytes_restored'])} restored ({_size(r.get('bytes_prefetched', 0))} prefetched ahead of use), "
            f"{_size(r.get('bytes_discarded', 0))} freed data dropped without a copy")


def format_status(report: dict[str, Any]) -> str:
    daemon = report["daemon"]
    lines = [f"libremote daemon {daemon['address']} (libremote {daemon['libremote']}, torch {daemon['torch']}, "
             f"pid {daemon['pid']} on {daemon['host']})"]
    if daemon.get("graph_compiler", "none") != "none":
        compiled = sum(s.get("graphs_compiled", 0) for s in report["sessions"])
        pending = sum(s.get("graph_compiles_pending", 0) for s in report["sessions"])
        lines.append(f"graph compiler {daemon['graph_compiler']}: {compiled} graphs compiled, {pending} compiling")
    lines.append("")
    lines.append(f"{'DEV':<4}{'NAME':<44}{'MEMORY USED / TOTAL':>24}{'UTIL':>7}{'SESSIONS':>10}{'SPILLED':>12}")
    for device in report["devices"]:
        memory = f"{_size(device['memory_used'])} / {_size(device['memory_total'])}"
        residency = device.get("residency")
        spilled = _size(residency["spilled_bytes"]) if residency else "-"
        lines.append(f"{device['index']:<4}{device['name'][:43]:<44}{memory:>24}{device['utilization']:>7.0%}"
                     f"{device['sessions']:>10}{spilled:>12}")
    for device in report["devices"]:
        if device.get("residency"):
            lines.append(_residency_line(device["index"], device["residency"]))
    lines.append("")
    if report["sessions"]:
        lines.append(f"{'SESSION':<14}{'TENANT':<14}{'PRIO':<8}{'WEIGHT':>7}{'DEV':>5}{'MEMORY':>12}{'SPILLED':>12}"
                     f"{'QUOTA':>12}{'OPS':>11}{'DEV TIME':>11}  CLIENT")
        for s in report["sessions"]:
            lines.append(f"{s['session']:<14}{s['tenant'][:13]:<14}{s['priority']:<8}{s['weight']:>7g}{s['device']:>5}"
                         f"{_size(s['memory_allocated']):>12}{_size(s.get('memory_spilled', 0)):>12}"
                         f"{_size(s['memory_quota']):>12}{s['ops']:>11}"
                         f"{s['device_time_s']:>10.2f}s  pid {s['pid']} on {s['host']}")
    else:
        lines.append("no sessions")
    if report["waiting"]:
        lines.append("")
        lines.append(f"waiting for a session slot: {len(report['waiting'])}")
        for w in report["waiting"]:
            lines.append(f"  tenant {w['tenant']} ({w['priority']}), waiting {w['waited_s']:.1f} s, pid {w['pid']} on {w['host']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="libremote", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("status", "admin"):
        sub = commands.add_parser(name)
        sub.add_argument("--server", default=os.environ.get("LIBREMOTE_SERVER"),
                         help="daemon address (default: LIBREMOTE_SERVER)")
        sub.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the daemon")
        if name == "status":
            sub.add_argument("--json", action="store_true", help="print the report as JSON")
        else:
            target = sub.add_mutually_exclusive_group(required=True)
            target.add_argument("--session", help="a session id (see libremote status)")
            target.add_argument("--tenant", help="a tenant: its live sessions and its future ones")
            sub.add_argument("--memory-quota", help="new quota per session, e.g. 16GiB")
            sub.add_argument("--weight", type=float, help="new share weight")
            sub.add_argument("--priority", choices=["high", "normal", "low"])
            sub.add_argument("--token", default=os.environ.get("LIBREMOTE_ADMIN_TOKEN"),
                             help="the daemon's admin token (default: LIBREMOTE_ADMIN_TOKEN)")
    args = parser.parse_args(argv)
    if not args.server:
        parser.error("no daemon address: give --server tcp://host:port or set LIBREMOTE_SERVER")
    if args.command == "status":
        report = query_status(args.server, args.timeout)
        print(json.dumps(report, indent=2) if args.json else format_status(report))
        return 0
    request = {"token": args.token, "session": args.session, "tenant": args.tenant,
               "memory_quota": args.memory_quota, "weight": args.weight, "priority": args.priority}
    reply = _ask(args.server, [Msg.ADMIN, request], args.timeout)
    result = reply[1] if reply[0] == Msg.ADMIN else {"ok": False, "message": f"unexpected answer {reply!r:.200}"}
    print(result.get("message", ""))
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
