"""etcd through its v3 JSON gateway, with the maintained ``etcd3gw`` client.

Why etcd3gw: it speaks the HTTP/JSON gateway every etcd 3.4+ serves on its client port, so it
needs only ``requests`` — no grpcio and no generated protobuf modules whose versions must match
the interpreter's (the ``etcd3`` package is unmaintained and pins an old protobuf). It is kept up
by OpenStack (etcd3gw 2.x), typed, and small enough to read. This module adds what the pool needs
on top of it: several endpoints with failover (etcd3gw talks to one), user/password
authentication (etcd3gw handles TLS but not etcd's auth tokens), revision-aware reads and
transactions with range compares (``Compare.range_end``), which etcd3gw's helpers do not expose.

Every call either succeeds against one of the endpoints or raises :class:`EtcdUnavailable`
saying which endpoints were tried and why; callers decide whether to wait and retry (the
daemon's registration) or to tell the user (a client's placement).
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

try:  # (the pool is an extra: pip install 'libremote[pool]'; a daemon without --pool never needs it)
    import etcd3gw  # type: ignore[import-untyped,unused-ignore]
    import requests  # (etcd3gw's own HTTP client)
    from etcd3gw import exceptions as etcd_errors  # type: ignore[import-untyped,unused-ignore]
    from etcd3gw import watch as etcd_watch  # type: ignore[import-untyped,unused-ignore]
except ImportError:  # pragma: no cover
    etcd3gw = None  # type: ignore[assignment,unused-ignore]

from .address import Credentials, PoolAddress

#: Seconds one HTTP request to one member may take before the next member is tried.
REQUEST_TIMEOUT_S = 3.0


class EtcdUnavailable(RuntimeError):
    """No endpoint of the pool's etcd answered (or each refused); the message says which and why."""


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


def _b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def prefix_end(prefix: str) -> str:
    """The end of the key range of ``prefix`` (its last byte plus one), as etcd wants it."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return raw.decode()


def _kv(raw: dict[str, Any]) -> KeyValue:
    return KeyValue(key=base64.b64decode(raw["key"]).decode(), value=base64.b64decode(raw.get("value", "")),
                    create_revision=int(raw.get("create_revision", 0)), mod_revision=int(raw.get("mod_revision", 0)),
                    version=int(raw.get("version", 0)), lease=int(raw.get("lease", 0)))


# Transaction parts: small dicts in the gateway's JSON form, built by these helpers.
def compare_mod_below(prefix: str, revision: int) -> dict[str, Any]:
    """True when no key under ``prefix`` was created or changed after ``revision`` (deleted keys
    do not count: a deletion only ever frees capacity)."""
    return {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix)), "target": "MOD", "result": "LESS",
            "mod_revision": revision + 1}


def compare_absent(key: str) -> dict[str, Any]:
    return {"key": _b64(key), "target": "VERSION", "result": "EQUAL", "version": 0}


def compare_present(key: str) -> dict[str, Any]:
    return {"key": _b64(key), "target": "VERSION", "result": "GREATER", "version": 0}


def compare_mod_equal(key: str, revision: int) -> dict[str, Any]:
    return {"key": _b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": revision}


def put_op(key: str, value: bytes | str, lease: int = 0) -> dict[str, Any]:
    request: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
    if lease:
        request["lease"] = lease
    return {"request_put": request}


def delete_op(key: str) -> dict[str, Any]:
    return {"request_delete_range": {"key": _b64(key)}}


class Etcd:
    """A connection to one pool's etcd cluster (any member will do; on failure, the next)."""

    def __init__(self, address: PoolAddress, credentials: Credentials | None = None,
                 timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        if etcd3gw is None:
            raise ImportError("the pool's etcd client is not installed: pip install 'libremote[pool]' (etcd3gw)")
        self.address = address
        self.credentials = credentials or Credentials()
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._current = 0
        self._clients = [self._client(host, port) for host, port in address.endpoints]
        self._token: str | None = None

    def _client(self, host: str, port: int) -> Any:
        creds = self.credentials
        # Our own session: requests would let REQUESTS_CA_BUNDLE override the CA given, and
        # HTTP(S)_PROXY send etcd traffic through a proxy. etcd is reached directly, with the
        # CA and client certificate the operator named.
        session = requests.Session()
        session.trust_env = False
        if creds.ca:
            session.verify = creds.ca
        if creds.cert and creds.key:
            session.cert = (creds.cert, creds.key)
        return etcd3gw.client(host=host, port=port, protocol="https" if creds.tls else "http", timeout=self.timeout_s,
                              api_path="/v3/", session=session)

    # ------------------------------------------------------------------------------------------
    def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` to the gateway's ``path`` on the current member, failing over to the
        others in turn; re-authenticates once when the token expired."""
        failures = []
        count = len(self._clients)
        start = self._current
        for step in range(count):
            index = (start + step) % count
            client = self._clients[index]
            try:
                return self._post(client, path, body)
            except (etcd_errors.ConnectionFailedError, etcd_errors.ConnectionTimeoutError,
                    etcd_errors.InternalServerError) as exc:
                failures.append(f"{client.host}:{client.port}: {_short(exc)}")
                if isinstance(exc, etcd_errors.InternalServerError) and not _member_trouble(exc):
                    raise EtcdUnavailable(f"etcd refused a request: {_short(exc)}") from None
            self._current = (index + 1) % count
        raise EtcdUnavailable(f"no etcd member of {self.address} answered: " + "; ".join(failures))

    def _post(self, client: Any, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if self.credentials.user and self._token is None:
            self._authenticate(client)
        try:
            answer: dict[str, Any] = client.post(client.get_url(path), json=body)
            return answer
        except etcd_errors.Etcd3Exception as exc:
            if self.credentials.user and "token" in str(getattr(exc, "detail_text", "") or "").lower():
                self._authenticate(client)  # (expired or issued by a member that restarted)
                retried: dict[str, Any] = client.post(client.get_url(path), json=body)
                return retried
            if isinstance(exc, (etcd_errors.ConnectionFailedError, etcd_errors.ConnectionTimeoutError,
                                etcd_errors.InternalServerError)):
                raise
            raise EtcdUnavailable(f"etcd refused a request to {path}: {_short(exc)}") from None

    def _authenticate(self, client: Any) -> None:
        creds = self.credentials
        for other in self._clients:
            other.session.headers.pop("Authorization", None)
        try:
            answer = client.post(client.get_url("/auth/authenticate"),
                                 json={"name": creds.user, "password": creds.password or ""})
        except etcd_errors.Etcd3Exception as exc:
            if isinstance(exc, (etcd_errors.ConnectionFailedError, etcd_errors.ConnectionTimeoutError)):
                raise
            raise EtcdUnavailable(f"etcd refused user {creds.user!r}: {_short(exc)} (check LIBREMOTE_ETCD_USER "
                                  "and the password file)") from None
        self._token = str(answer["token"])
        for other in self._clients:
            other.session.headers["Authorization"] = self._token

    # ------------------------------------------------------------------------------------------
    def range_prefix(self, prefix: str) -> tuple[int, list[KeyValue]]:
        """Every key under ``prefix`` and the store's revision they were read at."""
        answer = self._call("/kv/range", {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))})
        return int(answer["header"]["revision"]), [_kv(raw) for raw in answer.get("kvs", ())]

    def get(self, key: str) -> KeyValue | None:
        answer = self._call("/kv/range", {"key": _b64(key)})
        kvs = answer.get("kvs") or []
        return _kv(kvs[0]) if kvs else None

    def put(self, key: str, value: bytes | str, lease: int = 0) -> int:
        body = put_op(key, value, lease)["request_put"]
        return int(self._call("/kv/put", body)["header"]["revision"])

    def delete(self, key: str, *, prefix: bool = False) -> None:
        body: dict[str, Any] = {"key": _b64(key)}
        if prefix:
            body["range_end"] = _b64(prefix_end(key))
        self._call("/kv/deleterange", body)

    def txn(self, compare: Sequence[dict[str, Any]], success: Sequence[dict[str, Any]],
            failure: Sequence[dict[str, Any]] = ()) -> tuple[bool, int]:
        """An etcd transaction: whether the compares held (and ``success`` ran), and the revision."""
        answer = self._call("/kv/txn", {"compare": list(compare), "success": list(success), "failure": list(failure)})
        return bool(answer.get("succeeded", False)), int(answer["header"]["revision"])

    def grant(self, ttl_s: int) -> int:
        """A new lease of ``ttl_s`` seconds (keys put under it vanish when it is not kept alive)."""
        return int(self._call("/lease/grant", {"TTL": ttl_s})["ID"])

    def keepalive(self, lease: int) -> int:
        """Renew ``lease``; its remaining TTL, or -1 when it has already expired."""
        answer = self._call("/lease/keepalive", {"ID": lease})
        return int(answer.get("result", {}).get("TTL", -1))

    def revoke(self, lease: int) -> None:
        self._call("/lease/revoke", {"ID": lease})

    def wait_for_change(self, prefix: str, after_revision: int, timeout_s: float) -> bool:
        """Block until a key under ``prefix`` changes after ``after_revision`` (True) or
        ``timeout_s`` passes (False). A member that fails makes this return early (True): the
        caller re-reads, which fails over."""
        client = self._clients[self._current]
        try:
            client.watch_prefix_once(prefix, timeout=timeout_s, start_revision=after_revision + 1)
            return True
        except etcd_errors.WatchTimedOut:
            return False
        except Exception:  # noqa: BLE001  (a member gone mid-watch: re-read through _call)
            self._current = (self._current + 1) % len(self._clients)
            return True

    def watch_prefix(self, prefix: str, start_revision: int,
                     callback: Callable[[str, KeyValue | None, int], None]) -> Callable[[], None]:
        """Call ``callback(key, kv or None for a deletion, revision)`` for every change under
        ``prefix`` from ``start_revision`` on, from etcd3gw's watch thread; returns the cancel."""
        client = self._clients[self._current]

        def on_event(event: Any) -> None:
            raw = event["kv"]
            key = raw["key"].decode() if isinstance(raw["key"], bytes) else str(raw["key"])
            revision = int(raw.get("mod_revision", 0))
            if event.get("type") == "DELETE":
                callback(key, None, revision)
                return
            value = raw.get("value", b"")
            callback(key, KeyValue(key=key, value=value if isinstance(value, bytes) else str(value).encode(),
                                   create_revision=int(raw.get("create_revision", 0)), mod_revision=revision,
                                   version=int(raw.get("version", 0)), lease=int(raw.get("lease", 0))), revision)

        watcher = etcd_watch.Watcher(client, prefix, on_event, start_revision=start_revision,
                                     range_end=prefix_end(prefix))
        stop: Callable[[], None] = watcher.stop
        return stop

    def close(self) -> None:
        for client in self._clients:
            client.session.close()


def _short(exc: BaseException) -> str:
    """etcd3gw keeps the detail in ``detail_text`` (the response, or requests' error)."""
    detail = str(getattr(exc, "detail_text", "") or "")
    if "Connection refused" in detail:
        detail = "connection refused"
    elif "timed out" in detail.lower():
        detail = "timed out"
    text = detail or " ".join(str(part) for part in getattr(exc, "args", ()) if part)
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__


def _member_trouble(exc: BaseException) -> bool:
    """Whether an HTTP 500 from a member is that member's trouble (no leader, timeout,
    stopping), which another member may not have, rather than a refused request."""
    text = (str(getattr(exc, "detail_text", "") or "") + str(exc)).lower()
    return any(word in text for word in ("leader", "timed out", "timeout", "stopping", "unavailable", "not capable"))
