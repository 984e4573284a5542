"""``libremote-server``: run the daemon (also ``python -m libremote_server``)."""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

from . import auth, limits, policy
from .front import Front
from .telemetry import http as telemetry_http
from .telemetry import logs
from .telemetry.config import TelemetryConfig

DEFAULT_LISTEN = "tcp://127.0.0.1:7777"


def _size(text: str) -> int:
    try:
        return policy.parse_size(text)
    except policy.PolicyError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, not {text!r}")
    return value


def _microseconds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number of microseconds >= 0, not {text!r}")
    return value


def _port_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    try:
        first, last = int(low), int(high or low)
    except ValueError:
        first = last = -1
    if not 0 < first <= last < 65536:
        raise argparse.ArgumentTypeError(f"expected ports LOW-HIGH, e.g. 7800-7899, not {text!r}")
    return first, last


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="libremote-server",
        description="Serve this machine's accelerator (or CPU) to libremote clients.",
    )
    parser.add_argument(
        "--listen", default=DEFAULT_LISTEN,
        help=f"ZeroMQ address to bind (default {DEFAULT_LISTEN}; port 0 picks a free port). A "
        "non-loopback address needs --auth-keys (or --insecure).",
    )
    parser.add_argument(
        "--auth-keys", metavar="DIR",
        help="authenticate and encrypt every connection with CURVE: DIR holds the daemon's key pair "
        "(server.key_secret) and the public keys it accepts, TENANT.key per tenant and admin/NAME.key "
        "for admins (see `libremote keygen`)",
    )
    parser.add_argument(
        "--server-key", metavar="FILE",
        help="the daemon's CURVE secret key file, if not DIR/server.key_secret (with --auth-keys)",
    )
    parser.add_argument(
        "--insecure", action="store_true",
        help="serve plain TCP (no authentication, no encryption: tokens and tensors travel in clear) "
        "on a non-loopback address; loopback addresses serve plain TCP without it",
    )
    parser.add_argument(
        "--loopback-admin", action="store_true",
        help="plain TCP only: peers on this host are admins (libremote status shows everything, "
        "libremote admin works) without the admin token. Every local user then is one",
    )
    parser.add_argument(
        "--max-sessions-per-tenant", type=_positive, default=limits.MAX_SESSIONS_PER_TENANT, metavar="N",
        help=f"sessions one tenant (of a tenants file or a CURVE key) may hold at once; its further clients wait "
        f"(default {limits.MAX_SESSIONS_PER_TENANT}; a tenant's max_sessions overrides it)",
    )
    parser.add_argument(
        "--op-time-limit", type=float, default=None, metavar="SECONDS",
        help="end a tenant's worker (and its sessions, with a clear error) when one op, or one slice of up to 64 "
        "commands, runs longer than this (default: no limit). Other tenants never wait on it either way",
    )
    parser.add_argument(
        "--worker-memory-margin", type=_size, default=limits.WORKER_MEMORY_MARGIN, metavar="SIZE",
        help="host memory a tenant's worker may take beyond its start, enforced by the OS (cgroup v2 where "
        "delegated, else RLIMIT_DATA), besides its tenant's quota on the CPU backend (default 1GiB)",
    )
    parser.add_argument(
        "--worker-ports", type=_port_range, default=None, metavar="LOW-HIGH",
        help="TCP ports the workers listen on (each client connects to its tenant's worker after admission); "
        "default: any free port. Open this range in firewalls along with --listen's port",
    )
    parser.add_argument("--unsafe-no-op-rules", dest="op_rules", action="store_false",
                        help=argparse.SUPPRESS)  # tests only: prove the process boundary without the rules
    parser.add_argument(
        "--device", default="auto",
        help="what the pool serves: auto (every accelerator torch sees, else the CPU), cpu, cuda, "
        "cuda:N, or a comma-separated list such as cuda:0,cuda:2 (default auto). On the CPU backend "
        "cpu,cpu makes two devices (for testing placement).",
    )
    parser.add_argument(
        "--memory-quota", type=_size, default=8 << 30, metavar="SIZE",
        help="device memory each session may hold, e.g. 8GiB (default 8GiB; tenants may set their own)",
    )
    parser.add_argument(
        "--max-sessions", type=_positive, default=limits.MAX_SESSIONS_PER_DEVICE, metavar="N",
        help=f"sessions per device; further clients wait in a queue (default {limits.MAX_SESSIONS_PER_DEVICE})",
    )
    parser.add_argument(
        "--max-handles", type=_positive, default=limits.MAX_HANDLES, metavar="N",
        help=f"live tensors one session may hold; past it, creating one fails like out-of-memory "
        f"(default {limits.MAX_HANDLES})",
    )
    parser.add_argument(
        "--placement", choices=["binpack", "spread"], default="binpack",
        help="binpack fills one device before the next; spread balances sessions (default binpack)",
    )
    parser.add_argument("--tenants", metavar="FILE", help="TOML file of tenants: tokens, quotas, weights, priorities")
    parser.add_argument(
        "--device-memory", type=_size, default=None, metavar="SIZE",
        help="device memory the pool may keep resident per device, e.g. 40GiB (default: a GPU's own "
        "size less 6%% headroom, at least 2GiB, for the CUDA context and workspaces); on the CPU "
        "backend it is the budget that spilling is tested against",
    )
    parser.add_argument(
        "--host-spill", type=_size, default=0, metavar="SIZE",
        help="host RAM for storages spilled off the device when it is full, e.g. 64GiB (default 0: "
        "no spilling; a full device raises out-of-memory)",
    )
    parser.add_argument(
        "--oversubscribe", type=float, default=None, metavar="RATIO",
        help="admit sessions while their quotas add up to at most RATIO x device memory, e.g. 2.0 "
        "(default: quotas are not summed at admission)",
    )
    parser.add_argument(
        "--no-cuda-graphs", dest="cuda_graphs", action="store_const", const="off", default="auto",
        help="interpret graph-mode graphs node by node on GPUs instead of replaying them as CUDA graphs",
    )
    parser.add_argument(
        "--emulate-cuda-graphs", dest="cuda_graphs", action="store_const", const="emulate",
        help="replay graph-mode graphs by the CUDA-graph rules on the CPU backend too (for testing libremote)",
    )
    parser.add_argument(
        "--graph-compiler", choices=("none", "inductor"), default="none",
        help="compile graph-mode graphs with TorchInductor in the background (fused kernels; default "
        "none: interpret them). Compiled code checks indices with device-side asserts, which end the "
        "CUDA context of every session on the GPU when they fire: use it for tenants you trust",
    )
    parser.add_argument(
        "--idle-timeout", type=float, default=None, metavar="SECONDS",
        help="reclaim sessions that sent no work for this long (default: never)",
    )
    parser.add_argument(
        "--max-message-size", type=_size, default=limits.MAX_MESSAGE_BYTES, metavar="SIZE",
        help=f"largest message frame accepted (default {limits.MAX_MESSAGE_BYTES >> 20}MiB; libremote clients "
        "send tensor data in pieces of at most 8MiB); a larger one disconnects the peer",
    )
    parser.add_argument(
        "--heartbeat", type=float, default=2.0, metavar="SECONDS",
        help="how often clients must show they are alive (default 2 s)",
    )
    parser.add_argument(
        "--heartbeat-timeout", type=float, default=10.0, metavar="SECONDS",
        help="a client silent this long is presumed dead and its session and memory are reclaimed (default 10 s)",
    )
    parser.add_argument(
        "--spin-us", type=_microseconds, default=300, metavar="MICROSECONDS",
        help="after each message, poll for the next one this long before sleeping (default 300; 0: "
        "sleep at once). Saves a wake-up per round trip for clients that sync often, at the cost "
        "of a core kept busy (yielding) for that long after each message",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument(
        "--log-format", default="text", choices=["text", "json"],
        help="json: one JSON object per line, with event, session, tenant and request ids (docs/DEPLOYMENT.md)",
    )
    pooled = parser.add_argument_group("one pool across many servers (docs/POOL.md)")
    pooled.add_argument(
        "--pool", metavar="etcd://HOST:PORT[,HOST:PORT...]/NAME", default=None,
        help="join the pool NAME kept in this etcd cluster: register this daemon and its devices under a lease "
        "(it leaves when it stops or dies), and admit only clients the pool placed here (their reservations are "
        "checked in etcd). Needs pip install 'libremote[pool]' (etcd3gw)",
    )
    pooled.add_argument("--node-name", default=None, metavar="NAME",
                        help="this server's name in the pool (default: the host name); clients pin it with LIBREMOTE_NODE")
    pooled.add_argument("--pool-advertise", default=None, metavar="tcp://HOST:PORT",
                        help="the address clients of the pool reach this daemon at (default: --listen, a wildcard "
                        "host replaced by this host's name)")
    pooled.add_argument("--etcd-user", default=None, help="etcd user (else LIBREMOTE_ETCD_USER)")
    pooled.add_argument("--etcd-password-file", default=None, metavar="FILE",
                        help="a file holding that user's password (else LIBREMOTE_ETCD_PASSWORD_FILE)")
    pooled.add_argument("--etcd-ca", default=None, metavar="FILE", help="CA of etcd's TLS certificates: speak HTTPS")
    pooled.add_argument("--etcd-cert", default=None, metavar="FILE", help="client certificate for etcd's TLS")
    pooled.add_argument("--etcd-key", default=None, metavar="FILE", help="that certificate's private key")
    observe = parser.add_argument_group("metrics, dashboard and health (docs/METRICS.md, docs/DEPLOYMENT.md)")
    observe.add_argument(
        "--metrics-listen", metavar="HOST:PORT", default=None,
        help="serve Prometheus metrics (/metrics), the live dashboard (/) and probes (/healthz, /readyz) over "
        "HTTP here (default: off; PORT alone means 127.0.0.1:PORT). Off loopback it needs a token "
        "(--metrics-token-file, else the tenants file's admin token) or --metrics-insecure",
    )
    observe.add_argument(
        "--metrics-token-file", metavar="FILE", default=None,
        help="a file holding the token the metrics endpoint and dashboard want (Authorization: Bearer TOKEN, "
        "or HTTP Basic with it as password)",
    )
    observe.add_argument(
        "--metrics-insecure", action="store_true",
        help="serve metrics and dashboard off loopback without a token (a management network you trust)",
    )
    observe.add_argument(
        "--metrics-interval", type=float, default=2.0, metavar="SECONDS",
        help="how often the front gathers its workers' figures for the metrics and dashboard (default 2)",
    )
    observe.add_argument(
        "--health-interval", type=float, default=5.0, metavar="SECONDS",
        help="how often devices (NVML) and the host are sampled (default 5; 0: once at start)",
    )
    observe.add_argument(
        "--health-max-temperature", type=float, default=None, metavar="CELSIUS",
        help="a device this hot takes no new sessions until 5 degrees cooler (default: NVML's slowdown "
        "threshold less 5, else 90)",
    )
    observe.add_argument("--health-inject", default=None, help=argparse.SUPPRESS)  # tests only: fake figures
    return parser


def telemetry_config(args: argparse.Namespace, pool_config: policy.PoolConfig) -> TelemetryConfig:
    """The metrics endpoint's settings; refuses an endpoint off loopback without a token unless
    --metrics-insecure."""
    token = None
    if args.metrics_token_file:
        try:
            token = open(args.metrics_token_file).read().strip()
        except OSError as exc:
            raise policy.PolicyError(f"--metrics-token-file: {exc}") from None
        if not token:
            raise policy.PolicyError(f"--metrics-token-file {args.metrics_token_file} is empty")
    elif args.metrics_listen:
        token = pool_config.admin_token
    if args.metrics_listen:
        host, _ = telemetry_http.parse_listen(args.metrics_listen)
        if not telemetry_http.is_loopback_host(host) and not token and not args.metrics_insecure:
            raise policy.PolicyError(
                f"refusing to serve metrics and the dashboard on {args.metrics_listen} to anyone: give "
                "--metrics-token-file FILE (or a tenants file with an admin token), bind it to loopback, or "
                "--metrics-insecure on a management network you trust")
    if args.metrics_interval <= 0:
        raise policy.PolicyError("--metrics-interval must be above 0")
    return TelemetryConfig(listen=args.metrics_listen, token=token, insecure=args.metrics_insecure,
                           interval_s=args.metrics_interval, health_interval_s=max(0.0, args.health_interval),
                           max_temperature_c=args.health_max_temperature, health_inject=args.health_inject)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and serve until SIGINT/SIGTERM; then the process exits (this
    returns only for a command line or address it refuses, with 2)."""
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format, "front")
    try:
        pool_config = policy.PoolConfig(
            default_memory_quota=args.memory_quota,
            max_sessions_per_device=args.max_sessions,
            max_sessions_per_tenant=args.max_sessions_per_tenant,
            max_handles=args.max_handles,
            placement=args.placement,
            idle_timeout_s=args.idle_timeout,
            device_memory=args.device_memory,
            host_spill=args.host_spill,
            oversubscribe=args.oversubscribe,
            cuda_graphs=args.cuda_graphs,
            graph_compiler=args.graph_compiler,
        )
        if args.tenants:
            pool_config.tenants, pool_config.admin_token = policy.load_tenants(
                args.tenants, tokens_required=not args.auth_keys)
        keyring = _transport(args, pool_config)
        telemetry = telemetry_config(args, pool_config)
        pool_member = _pool_membership(args)
    except (ValueError, policy.PolicyError) as exc:
        print(f"libremote-server: {exc}", file=sys.stderr)
        return 2
    try:
        front = Front(
            args.listen, args.device, pool_config=pool_config, max_message_bytes=args.max_message_size,
            heartbeat_s=args.heartbeat, heartbeat_timeout_s=args.heartbeat_timeout, spin_us=args.spin_us,
            keyring=keyring, auth_keys=args.auth_keys, server_key=args.server_key, loopback_admin=args.loopback_admin,
            op_time_limit_s=args.op_time_limit, worker_memory_margin=args.worker_memory_margin,
            worker_ports=args.worker_ports, op_rules=args.op_rules, log_level=args.log_level, telemetry=telemetry,
            pool_member=pool_member,
        )
    except ValueError as exc:  # --device names what this machine does not have
        print(f"libremote-server: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # zmq.ZMQError: address in use, bad endpoint
        print(f"libremote-server: cannot listen on {args.listen}: {exc}", file=sys.stderr)
        return 2
    if not args.op_rules:
        logging.getLogger("libremote.server").warning(
            "--unsafe-no-op-rules: workers run any aten op unchecked (tests of the process boundary only)")

    def _on_signal(signum: int, _frame: object) -> None:
        logging.getLogger("libremote.server").info("received %s, stopping", signal.Signals(signum).name)
        front.stop()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    front.serve_forever()
    logging.shutdown()
    return 0


def _pool_membership(args: argparse.Namespace) -> Any:
    """``--pool`` and its companions, or None. etcd3gw is imported only here, for --pool."""
    if not args.pool:
        return None
    try:
        from libremote_wire.pool.address import Credentials, parse, read_secret

        from .pool_agent import Membership
    except ImportError as exc:
        raise policy.PolicyError(f"--pool needs the etcd client ({exc}): pip install 'libremote[pool]'") from None
    password = read_secret(args.etcd_password_file, "--etcd-password-file") if args.etcd_password_file else None
    credentials = Credentials.from_env().overridden(user=args.etcd_user, password=password, ca=args.etcd_ca,
                                                    cert=args.etcd_cert, key=args.etcd_key)
    return Membership(parse(args.pool), credentials, args.node_name or socket.gethostname(), args.pool_advertise)


def _transport(args: argparse.Namespace, pool_config: policy.PoolConfig) -> auth.KeyRing | None:
    """CURVE's key ring, or None for plain TCP; refuse plain TCP off loopback unless --insecure.

    Plain TCP carries tokens and tensors in clear and ties sessions to routing ids only, so it
    stays on this host unless the operator asks for it by name (server/auth.py)."""
    log = logging.getLogger("libremote.server")
    if args.auth_keys:
        if args.insecure or args.loopback_admin:
            raise policy.PolicyError("--auth-keys cannot be combined with --insecure or --loopback-admin "
                                   "(with keys, admins have admin keys: DIR/admin/NAME.key)")
        keyring = auth.KeyRing(args.auth_keys, args.server_key)
        log.info("CURVE: %d client keys (%d tenants) accepted from %s", len(keyring.identities),
                 len(keyring.tenants()), args.auth_keys)
        if pool_config.has_tenants:
            for name in sorted(keyring.tenants() - set(pool_config.tenants)):
                log.warning("tenant %r has a key but no entry in %s: its clients will be refused", name, args.tenants)
        return keyring
    if args.server_key:
        raise policy.PolicyError("--server-key needs --auth-keys DIR")
    if not auth.is_loopback_endpoint(args.listen):
        if not args.insecure:
            raise policy.PolicyError(
                f"refusing to serve {args.listen} without authentication: give --auth-keys DIR (CURVE keys, "
                "see `libremote keygen`), or --insecure to serve plain TCP there anyway")
        log.warning("--insecure: serving plain TCP on %s; anyone who can reach it can connect, and tokens and "
                    "tensors travel unencrypted. Use --auth-keys on networks you do not fully trust", args.listen)
    return None
