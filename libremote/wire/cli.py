"""``libremote``: look at and steer a running daemon.

    libremote status --server tcp://gpu01:7777 [--json] [--watch [SECONDS]]
    libremote status --server tcp://gpu01:7777,tcp://gpu02:7777      # several daemons: the pool
    libremote admin --server tcp://gpu01:7777 --drain                # no new sessions (--undrain)
    libremote admin --server tcp://gpu01:7777 --session ab12cd34ef56 --memory-quota 16GiB
    libremote admin --server tcp://gpu01:7777 --tenant research --weight 2 --priority high
    libremote status --pool etcd://h1:2379,h2:2379/gpus [--json]     # a pool on etcd (docs/POOL.md)
    libremote admin --pool etcd://h1:2379/gpus --tenant-quota research:memory=64GiB,devices=8
    libremote admin --pool etcd://h1:2379/gpus --exclusive gpu01:7777/0    # (--shared) when empty
    libremote keygen daemon --dir keys/      # the daemon's key pair: keys/server.key(_secret)
    libremote keygen client research         # a client's: ./research.key(_secret)

``status`` prints the pool like ``nvidia-smi``: devices (model, memory used/total, utilization,
health: temperature, power, clocks, ECC and XID errors where NVML is, what the host tells
elsewhere) and sessions (tenant, priority, weight, memory, ops, device time); ``--watch`` redraws
it every few seconds (with ``rich`` if installed, plain text otherwise). ``admin`` changes a session's
or a tenant's quota, weight or priority on the live daemon, effective at once. Both need an admin
identity: an admin key on a daemon with ``--auth-keys`` (``LIBREMOTE_CLIENT_KEY``,
``LIBREMOTE_SERVER_KEY``), else the daemon's admin token (``--token`` or ``LIBREMOTE_ADMIN_TOKEN``)
or a daemon started with ``--loopback-admin``. A tenant (its key, or ``LIBREMOTE_TENANT`` and
``LIBREMOTE_TOKEN``) sees its own sessions in ``status``. ``keygen`` writes CURVE key pairs
(``libremote/wire/curve_keys.py``). It imports no torch: it starts in a blink on any machine.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from . import codec, curve_keys
from .messages import Msg


def _client_keys() -> curve_keys.ClientKeys | None:
    """CURVE keys from LIBREMOTE_CLIENT_KEY / LIBREMOTE_SERVER_KEY, as the client library reads them."""
    try:
        return curve_keys.ClientKeys.from_files(os.environ.get("LIBREMOTE_CLIENT_KEY", "").strip() or None,
                                                os.environ.get("LIBREMOTE_SERVER_KEY", "").strip() or None)
    except curve_keys.KeyFileError as exc:
        raise SystemExit(f"libremote: {exc}") from None


def _ask(address: str, message: list[Any], timeout_s: float) -> list[Any]:
    """Send one request and return the answer; a daemon that refuses the connection's handshake
    (CURVE key unknown, CURVE on one side only) is reported as such, not as silence."""
    keys = _client_keys()
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, secrets.token_bytes(16))
    if keys is not None:
        keys.apply(sock)
    monitor = sock.get_monitor_socket(curve_keys.HANDSHAKE_FAILED_EVENTS)
    try:
        sock.connect(address)
        sock.send(codec.packb(message))
        deadline = time.monotonic() + timeout_s
        while not sock.poll(100, zmq.POLLIN):
            if monitor.poll(0):
                failure = curve_keys.handshake_failure(recv_monitor_message(monitor)["event"], address, keys is not None)
                if failure:
                    raise SystemExit(failure)
            if time.monotonic() > deadline:
                raise SystemExit(f"libremote: no daemon answered at {address} within {timeout_s:g} s")
        answer: list[Any] = codec.unpackb(sock.recv())
        return answer
    finally:
        sock.disable_monitor()
        monitor.close(0)
        sock.close(0)
        context.term()


def _credentials(admin_token: str | None = None) -> dict[str, Any]:
    """What a plain-TCP daemon needs to know who asks (with CURVE the key says it): the admin
    token, or a tenant's name and token (LIBREMOTE_TENANT, LIBREMOTE_TOKEN) to see its sessions."""
    return {"token": admin_token or os.environ.get("LIBREMOTE_ADMIN_TOKEN") or None,
            "tenant": os.environ.get("LIBREMOTE_TENANT") or None,
            "tenant_token": os.environ.get("LIBREMOTE_TOKEN") or None}


def query_status(address: str, timeout_s: float = 10.0, admin_token: str | None = None) -> dict[str, Any]:
    """The daemon's status report (what ``libremote status --json`` prints), as a dict: all of it
    for an admin, a tenant's own sessions for a tenant."""
    reply = _ask(address, [Msg.STATUS, _credentials(admin_token)], timeout_s)
    if reply[0] == Msg.REFUSED:
        raise SystemExit(f"libremote: the daemon at {address} refused: {reply[1]}")
    if reply[0] != Msg.STATUS:
        raise SystemExit(f"libremote: unexpected answer {reply!r:.200}")
    report: dict[str, Any] = reply[1]
    return report


def keygen(role: str, directory: str, name: str | None) -> str:
    """Write a key pair and return how to use it (see libremote/wire/curve_keys.py)."""
    name = "server" if role == "daemon" else name
    if not name:
        raise SystemExit("libremote keygen client: give a NAME (the tenant, e.g. research)")
    try:
        public, secret = curve_keys.generate(directory, name)
    except curve_keys.KeyFileError as exc:
        raise SystemExit(f"libremote: {exc}") from None
    if role == "daemon":
        admins = Path(directory) / "admin" / "NAME.key"
        return (f"wrote {secret} (secret, mode 0600: keep it on the daemon's host) and {public} (public).\n"
                f"Start the daemon with:   libremote-server --auth-keys {directory} ...\n"
                f"Put clients' public keys in {directory} as TENANT.key (admins: {admins}),\n"
                f"and give every client {public}, to set as LIBREMOTE_SERVER_KEY.")
    return (f"wrote {secret} (secret, mode 0600: never share it) and {public} (public).\n"
            f"Send {public} to the daemon's operator, who copies it into the daemon's --auth-keys directory as\n"
            f"{name}.key (tenant {name!r}; into its admin/ folder for an admin). Then on this machine:\n"
            f"  export LIBREMOTE_CLIENT_KEY={secret}\n"
            f"  export LIBREMOTE_SERVER_KEY=<the daemon's server.key>")


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


def _figure(value: Any, unit: str, scale: float = 1.0, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value * scale:.{digits}f}{unit}"


def _health_line(device: dict[str, Any]) -> str:
    """One device's health: healthy or why not, and its figures ("n/a": not available here)."""
    health = device.get("health") or {}
    state = "healthy" if health.get("healthy", True) else "UNHEALTHY: " + "; ".join(
        reason.get("message", "") for reason in health.get("reasons") or ())
    if health.get("source") == "nvml":
        throttled = [reason for reason in health.get("throttle_reasons") or () if reason != "gpu_idle"]
        xids = ", ".join(f"{xid} ({count}x)" for xid, count in (health.get("xid_events") or {}).items()) or "none"
        figures = (f"{_figure(health.get('temperature_c'), ' C')} (limit {_figure(health.get('temperature_limit_c'), ' C')}), "
                   f"power {_figure(health.get('power_w'), '')}/{_figure(health.get('power_limit_w'), ' W')}, "
                   f"fan {_figure(health.get('fan_ratio'), '%', 100)}, SM {_figure(health.get('sm_clock_hz'), ' MHz', 1e-6)}, "
                   f"mem {_figure(health.get('memory_clock_hz'), ' MHz', 1e-6)}, util {_figure(health.get('utilization'), '%', 100)}, "
                   f"ECC {health.get('ecc_corrected', 'n/a')} corrected / {health.get('ecc_uncorrected', 'n/a')} uncorrected, "
                   f"XID {xids}, throttled: {', '.join(throttled) or 'no'}")
    else:
        figures = (f"temperature {_figure(health.get('temperature_c'), ' C')}; GPU figures not available"
                   f" ({health.get('unavailable_because') or 'no NVML'})")
    return f"dev {device['index']}: {state}; {figures}"


def format_status(report: dict[str, Any]) -> str:
    daemon = report["daemon"]
    lines = [f"libremote daemon {daemon['address']} (libremote {daemon['libremote']}, torch {daemon['torch']}, "
             f"pid {daemon['pid']} on {daemon['host']})"]
    if daemon.get("draining"):
        lines.append(f"DRAINING: {daemon['draining']} (no new sessions; libremote admin --undrain)")
    host = report.get("host") or {}
    if host:
        memory = (f"{_size(host['memory_available_bytes'])} of {_size(host['memory_total_bytes'])} memory available"
                  if host.get("memory_available_bytes") is not None and host.get("memory_total_bytes") else "memory n/a")
        lines.append(f"host: load {_figure(host.get('load1'), '', digits=2)} on {host.get('cpus', '?')} CPUs, "
                     f"CPU {_figure(host.get('cpu_utilization'), '%', 100)}, {memory}, "
                     f"temperature {_figure(host.get('temperature_c'), ' C')}")
    if daemon.get("graph_compiler", "none") != "none":
        compiled = sum(s.get("graphs_compiled", 0) for s in report["sessions"])
        pending = sum(s.get("graph_compiles_pending", 0) for s in report["sessions"])
        lines.append(f"graph compiler {daemon['graph_compiler']}: {compiled} graphs compiled, {pending} compiling")
    lines.append("")
    lines.append(f"{'DEV':<4}{'NAME':<44}{'MEMORY USED / TOTAL':>24}{'UTIL':>7}{'SESSIONS':>10}{'SPILLED':>12}"
                 f"  HEALTH")
    for device in report["devices"]:
        memory = f"{_size(device['memory_used'])} / {_size(device['memory_total'])}"
        residency = device.get("residency")
        spilled = _size(residency["spilled_bytes"]) if residency else "-"
        healthy = (device.get("health") or {}).get("healthy", True)
        lines.append(f"{device['index']:<4}{device['name'][:43]:<44}{memory:>24}{device['utilization']:>7.0%}"
                     f"{device['sessions']:>10}{spilled:>12}  {'ok' if healthy else 'UNHEALTHY'}")
    for device in report["devices"]:
        lines.append(_health_line(device))
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


def pool_status(addresses: list[str], timeout_s: float) -> list[dict[str, Any]]:
    """The status of each daemon of a pool (a daemon that does not answer: a report saying so)."""
    reports = []
    for address in addresses:
        try:
            reports.append(query_status(address, timeout_s))
        except SystemExit as exc:
            if len(addresses) == 1:
                raise
            reports.append({"daemon": {"address": address, "error": str(exc)}, "devices": [], "sessions": [],
                            "waiting": [], "workers": []})
    return reports


def format_pool(reports: list[dict[str, Any]]) -> str:
    if len(reports) == 1:
        return format_status(reports[0])
    devices = sum(len(r["devices"]) for r in reports)
    sessions = sum(len(r["sessions"]) for r in reports)
    unhealthy = sum(1 for r in reports for d in r["devices"] if not (d.get("health") or {}).get("healthy", True))
    lines = [f"pool of {len(reports)} daemons: {devices} devices ({unhealthy} unhealthy), {sessions} sessions, "
             f"{sum(len(r['waiting']) for r in reports)} waiting", ""]
    for report in reports:
        error = report["daemon"].get("error")
        lines.append(f"== {report['daemon']['address']}: {error}" if error else format_status(report))
        lines.append("")
    return "\n".join(lines).rstrip()


def watch(addresses: list[str], interval_s: float, timeout_s: float, count: int | None = None) -> int:
    """Redraw the status every ``interval_s`` until interrupted (``count``: that many times)."""
    live_class: Any = None  # (without rich: clear the screen and print)
    try:
        from rich.console import Console
        from rich.live import Live
        from rich.text import Text

        live_class = Live
    except ImportError:
        pass
    shown = 0

    def frame() -> str:
        stamp = time.strftime("%H:%M:%S")
        return f"{format_pool(pool_status(addresses, timeout_s))}\n\n{stamp}, every {interval_s:g} s (Ctrl-C to stop)"

    try:
        if live_class is not None and sys.stdout.isatty():
            with live_class(Text(frame()), console=Console(), auto_refresh=False, screen=True) as live:
                while count is None or shown < count:
                    live.update(Text(frame()), refresh=True)
                    shown += 1
                    time.sleep(interval_s)
        else:
            while count is None or shown < count:
                text = frame()
                sys.stdout.write(("\x1b[H\x1b[2J" if sys.stdout.isatty() else "") + text + "\n")
                sys.stdout.flush()
                shown += 1
                if count is None or shown < count:
                    time.sleep(interval_s)
    except KeyboardInterrupt:
        pass
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="libremote", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    keys = commands.add_parser("keygen", help="write a CURVE key pair for a daemon or a client")
    keys.add_argument("role", choices=["daemon", "client"])
    keys.add_argument("name", nargs="?", help="client: the key's name, i.e. its tenant (daemon: always 'server')")
    keys.add_argument("--dir", default=".", help="where to write NAME.key and NAME.key_secret (default: here)")
    for name in ("status", "admin"):
        sub = commands.add_parser(name)
        sub.add_argument("--server", default=os.environ.get("LIBREMOTE_SERVER"),
                         help="daemon address (default: LIBREMOTE_SERVER)")
        sub.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the daemon")
        sub.add_argument("--pool", metavar="etcd://HOST:PORT[,...]/NAME", default=None,
                         help="a pool on etcd instead of one daemon (docs/POOL.md): status shows every daemon and "
                         "device, the queue and tenants' usage; admin sets pool quotas and sharing modes. etcd "
                         "credentials: LIBREMOTE_ETCD_USER, LIBREMOTE_ETCD_PASSWORD_FILE, LIBREMOTE_ETCD_CA, ...")
        if name == "status":
            sub.add_argument("--json", action="store_true", help="print the report as JSON (several daemons: a list)")
            sub.add_argument("--watch", nargs="?", type=float, const=2.0, default=None, metavar="SECONDS",
                             help="redraw every SECONDS (default 2) until Ctrl-C")
            sub.add_argument("--count", type=int, default=None, help=argparse.SUPPRESS)  # (tests: redraws, then exit)
        else:
            target = sub.add_mutually_exclusive_group(required=True)
            target.add_argument("--session", help="a session id (see libremote status)")
            target.add_argument("--tenant", help="a tenant: its live sessions and its future ones")
            target.add_argument("--drain", dest="drain", action="store_const", const=True,
                                help="take no new sessions (those open go on; readiness turns false)")
            target.add_argument("--undrain", dest="drain", action="store_const", const=False,
                                help="take new sessions again")
            target.add_argument("--tenant-quota", metavar="NAME:memory=SIZE,devices=N",
                                help="with --pool: cap a tenant's memory and devices across the whole pool")
            target.add_argument("--remove-quota", metavar="NAME", help="with --pool: lift a tenant's pool quota")
            target.add_argument("--exclusive", metavar="DAEMON/INDEX",
                                help="with --pool: one session owns this device (switch it when it is empty)")
            target.add_argument("--shared", metavar="DAEMON/INDEX",
                                help="with --pool: sessions share this device, each within its quota")
            sub.add_argument("--memory-quota", help="new quota per session, e.g. 16GiB")
            sub.add_argument("--weight", type=float, help="new share weight")
            sub.add_argument("--priority", choices=["high", "normal", "low"])
            sub.add_argument("--token", default=os.environ.get("LIBREMOTE_ADMIN_TOKEN"),
                             help="the daemon's admin token (default: LIBREMOTE_ADMIN_TOKEN)")
    args = parser.parse_args(argv)
    if args.command == "keygen":
        if args.role == "daemon" and args.name:
            parser.error("libremote keygen daemon takes no NAME (its key pair is server.key/.key_secret); use --dir DIR")
        print(keygen(args.role, args.dir, args.name))
        return 0
    if args.pool or (args.server or "").startswith("etcd://"):
        return _pool_command(args, parser)
    if args.command == "admin" and (args.tenant_quota or args.remove_quota or args.exclusive or args.shared):
        parser.error("--tenant-quota, --remove-quota, --exclusive and --shared act on a pool: add --pool etcd://...")
    if not args.server:
        parser.error("no daemon address: give --server tcp://host:port or set LIBREMOTE_SERVER")
    if args.command == "status":
        addresses = [address.strip() for address in args.server.split(",") if address.strip()]
        if args.watch is not None:
            return watch(addresses, max(0.2, args.watch), args.timeout, args.count)
        reports = pool_status(addresses, args.timeout)
        if args.json:
            print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
        else:
            print(format_pool(reports))
        return 0
    request = {"token": args.token or None, "session": args.session, "tenant": args.tenant,
               "memory_quota": args.memory_quota, "weight": args.weight, "priority": args.priority,
               "drain": args.drain}
    reply = _ask(args.server, [Msg.ADMIN, request], args.timeout)
    result = reply[1] if reply[0] == Msg.ADMIN else {"ok": False, "message": f"unexpected answer {reply!r:.200}"}
    print(result.get("message", ""))
    return 0 if result.get("ok") else 1


def _pool_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """status/admin of a pool on etcd (libremote_wire/pool; etcd3gw is imported only here)."""
    try:
        from .pool import address as pool_address
        from .pool import admin as pool_admin
        from .pool import status as pool_status_report
        from .pool.etcd import Etcd, EtcdUnavailable
    except ImportError as exc:
        raise SystemExit(f"libremote: --pool needs the etcd client ({exc}): pip install 'libremote[pool]'") from None
    try:
        etcd = Etcd(pool_address.parse(args.pool or args.server), pool_address.Credentials.from_env(),
                    timeout_s=args.timeout)
    except ValueError as exc:
        raise SystemExit(f"libremote: {exc}") from None
    try:
        if args.command == "status":
            data = pool_status_report.report(etcd)
            print(json.dumps(data, indent=2) if args.json else pool_status_report.format_report(data))
            return 0
        prefix = etcd.address.prefix
        if args.tenant_quota:
            tenant, quota = pool_admin.parse_quota(args.tenant_quota)
            print(pool_admin.set_quota(etcd, prefix, tenant, quota))
        elif args.remove_quota:
            print(pool_admin.remove_quota(etcd, prefix, args.remove_quota))
        elif args.exclusive or args.shared:
            print(pool_admin.set_sharing(etcd, prefix, args.exclusive or args.shared,
                                         "exclusive" if args.exclusive else "shared"))
        else:
            parser.error("with --pool, admin takes --tenant-quota, --remove-quota, --exclusive or --shared "
                         "(--drain and sessions are a daemon's: use --server tcp://...)")
        return 0
    except pool_admin.AdminError as exc:
        print(f"libremote: {exc}")
        return 1
    except EtcdUnavailable as exc:
        raise SystemExit(f"libremote: {exc}") from None
    finally:
        etcd.close()


if __name__ == "__main__":
    sys.exit(main())
