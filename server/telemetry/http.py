"""The daemon's HTTP endpoint: Prometheus metrics, the live dashboard, and probes.

Off unless ``--metrics-listen`` is given. It serves, from a thread of the front's process that
reads only what the front's loop publishes (collect.py):

- ``/metrics``: the Prometheus exposition (metrics.py, through ``prometheus-client``);
- ``/``: the dashboard (dashboard.html: the pool at a glance, memory and utilization over the
  last minutes, health, sessions by tenant, the queue), read-only, refreshed from ``/api/snapshot``;
- ``/api/snapshot``: the figures the dashboard draws, as JSON;
- ``/healthz`` (liveness: the front's loop turned within :data:`LIVENESS_S`) and ``/readyz``
  (readiness: not draining, a healthy device, workers can start), which say only ok or why not.

Access: bound to a loopback address, anyone on the host may read it (as with node_exporter).
Anywhere else it needs a token, ``Authorization: Bearer TOKEN`` (Prometheus' ``authorization``)
or HTTP Basic with the token as password (a browser's prompt), the token being
``--metrics-token-file``'s or the tenants file's admin token; or, on a management network the
operator trusts, ``--metrics-insecure``. The probes never need it and reveal nothing else.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol

from .metrics import Published

if TYPE_CHECKING:
    from .config import TelemetryConfig

log = logging.getLogger("libremote.server")

#: /healthz fails when the front's loop has not turned for this long (it turns every 50 ms idle).
LIVENESS_S = 15.0


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``PORT`` (loopback) -> (host, port)."""
    text = text.strip()
    if text.startswith("http://"):
        text = text[len("http://"):].rstrip("/")
    if text.isdigit():
        return "127.0.0.1", int(text)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--metrics-listen wants HOST:PORT or PORT, not {text!r}")
    host = host.strip("[]") or "127.0.0.1"
    if not 0 <= int(port) < 65536:
        raise ValueError(f"--metrics-listen: no port {port}")
    return host, int(port)


def is_loopback_host(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


class Served(Published, Protocol):
    """What the endpoint reads: the published snapshot and when the loop last came round."""

    loop_seen: float


class MetricsServer:
    """The HTTP server thread."""

    def __init__(self, telemetry: Served, config: TelemetryConfig) -> None:
        from prometheus_client import CollectorRegistry

        from .metrics import SnapshotCollector

        self.telemetry = telemetry
        host, port = parse_listen(config.listen or "")
        self.token = config.token.encode() if config.token else None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(telemetry))
        self.dashboard = resources.files(__package__).joinpath("dashboard.html").read_bytes()
        server_class = _V6Server if ":" in host else ThreadingHTTPServer
        self.server = server_class((host, port), _handler(self))
        self.server.daemon_threads = True
        bound_host, bound_port = str(self.server.server_address[0]), int(self.server.server_address[1])
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.url = f"http://{shown}:{bound_port}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="libremote-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("metrics, dashboard and probes on %s (/metrics, /, /healthz, /readyz)%s", self.url,
                 "; a token is required" if self.token else "")

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------------------------------
    def authorized(self, header: str | None) -> bool:
        if self.token is None:
            return True
        if not header:
            return False
        scheme, _, value = header.partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer":
            offered = value.encode()
        elif scheme.lower() == "basic":
            try:
                offered = base64.b64decode(value, validate=True).partition(b":")[2]
            except ValueError:
                return False
        else:
            return False
        return hmac.compare_digest(offered, self.token)

    def metrics(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def snapshot_json(self) -> bytes:
        telemetry = self.telemetry
        latest = telemetry.latest
        ready, why = telemetry.latest_readiness()
        if latest is None:
            body: dict[str, Any] = {"time": time.time(), "ready": ready, "ready_reason": why, "status": None,
                                    "history": []}
        else:
            health = telemetry.health.latest
            body = {key: latest[key] for key in ("time", "status", "tenants", "counters", "history")}
            body.update(ready=ready, ready_reason=why, health=health)
        return json.dumps(body, default=str).encode()


class _V6Server(ThreadingHTTPServer):
    import socket as _socket

    address_family = _socket.AF_INET6


def _handler(owner: MetricsServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "libremote"
        sys_version = ""
        timeout = 10  # (a slow or silent peer loses its connection, not a thread for good)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0]
            telemetry = owner.telemetry
            if path == "/healthz":
                age = time.monotonic() - telemetry.loop_seen
                if age < LIVENESS_S:
                    self._reply(200, b"ok\n", "text/plain; charset=utf-8")
                else:
                    self._reply(503, f"the daemon's loop has not turned for {age:.0f} s\n".encode(), "text/plain")
                return
            if path == "/readyz":
                ready, why = telemetry.latest_readiness()
                self._reply(200 if ready else 503, f"{why}\n".encode(), "text/plain; charset=utf-8")
                return
            if not owner.authorized(self.headers.get("Authorization")):
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="libremote", charset="UTF-8"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if path == "/metrics":
                body, content_type = owner.metrics()
                self._reply(200, body, content_type)
            elif path in ("/", "/index.html"):
                self._reply(200, owner.dashboard, "text/html; charset=utf-8")
            elif path == "/api/snapshot":
                self._reply(200, owner.snapshot_json(), "application/json")
            elif path == "/favicon.ico":
                self._reply(204, b"", "image/x-icon")
            else:
                self._reply(404, b"not found\n", "text/plain")

        def do_HEAD(self) -> None:  # noqa: N802
            self._reply(405, b"", "text/plain")

        def _reply(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Security-Policy", "default-src 'self'; style-src 'self' 'unsafe-inline'; "
                                                        "script-src 'self' 'unsafe-inline'; img-src 'self' data:")
            self.end_headers()
            if body:
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's name)
            log.debug("metrics endpoint: %s %s", self.address_string(), format % args)

    return Handler
