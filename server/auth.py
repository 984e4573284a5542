"""Who is talking to the daemon: CURVE keys, the identities they stand for, and what each may do.

Two transports (``libremote-server --help``):

- **CURVE** (``--auth-keys DIR``): every connection is authenticated and encrypted (CurveZMQ).
  The directory holds the public keys the daemon accepts, in pyzmq's certificate format::

      DIR/server.key_secret    the daemon's own key pair (``libremote keygen daemon --dir DIR``;
      DIR/server.key           --server-key FILE to keep it elsewhere); give server.key to clients
      DIR/research.key         a client key of tenant "research": the file name is the tenant
      DIR/admin/alice.key      an admin identity: ``libremote status`` sees everything, and
                               ``libremote admin`` may change quotas; it opens no sessions

  A ZAP handler (pyzmq's ``ThreadAuthenticator``) accepts known keys only and gives each
  connection a User-Id, ``tenant:NAME#KEY`` or ``admin:NAME#KEY`` (KEY: the connection's public
  key, z85), that ZeroMQ attaches to every message it delivers from that connection. The daemon
  reads the identity from there, per message; a tenant name or token in HELLO is ignored. Several
  keys may name one tenant (``research.key``, ``research.laptop.key``: everything before the
  first dot is the tenant).

- **Plain TCP** (no ``--auth-keys``): only on loopback, or anywhere with ``--insecure``. Nothing
  is encrypted; tenants (``--tenants``) prove who they are with tokens sent in clear, and the
  admin with the admin token. A session is tied to the client's ZeroMQ routing id, a random
  128-bit value only the client and daemon know, so taking over a session needs to read the
  traffic, which plain TCP does not prevent. (A session secret echoed in every BATCH would add
  nothing: whoever reads the routing id reads the secret beside it. Hence no such field.)

Sessions are bound to the key that opened them: a message for a session's routing id that
arrives with another User-Id (a peer that reconnected with a dropped client's routing id, even
with another key of the same tenant) is refused and leaves the session alone
(:func:`same_owner`). The same holds for a session's stripes (server/worker/stripes.py): extra
connections that carry its large frames are accepted from the session's own key only.

Who sees and changes what (:func:`requester`): an admin identity sees the whole pool and may
change it; a tenant sees only its own sessions and may change nothing. Loopback peers are
admins only when the operator opts in (``--loopback-admin``, plain TCP only).
"""

from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from libremote_wire import curve_keys

from .policy import PolicyError, PoolConfig, same_secret

log = logging.getLogger("libremote.server.auth")

TENANT, ADMIN = "tenant", "admin"
SERVER_KEY_NAME = "server"
ADMIN_FOLDER = "admin"


@dataclass(frozen=True)
class Identity:
    """An authenticated peer: a tenant's client or an admin. ``user_id`` is its ZAP User-Id."""

    kind: str  # TENANT or ADMIN
    name: str

    @property
    def user_id(self) -> str:
        return f"{self.kind}:{self.name}"

    def key_user_id(self, public_key: bytes) -> str:
        """The User-Id of a connection made with ``public_key`` (z85): the identity and the key,
        so that a session is bound to one key, not to every key of its tenant."""
        return f"{self.user_id}#{public_key.decode('ascii')}"

    @classmethod
    def from_user_id(cls, user_id: str | None) -> Identity | None:
        if not user_id or ":" not in user_id:
            return None
        kind, name = user_id.split("#", 1)[0].split(":", 1)
        return cls(kind, name) if kind in (TENANT, ADMIN) else None


class KeyRing:
    """The daemon's key pair and the client keys it accepts, read once from ``--auth-keys DIR``.

    Keys are read at start: adding or removing a client key takes a daemon restart (sessions of
    a removed key keep their connection until it drops)."""

    def __init__(self, directory: str | os.PathLike[str], server_key_file: str | os.PathLike[str] | None = None) -> None:
        folder = Path(directory)
        if not folder.is_dir():
            raise PolicyError(f"--auth-keys {directory}: not a directory (make keys with `libremote keygen`)")
        secret_file = Path(server_key_file) if server_key_file else folder / (SERVER_KEY_NAME + curve_keys.SECRET_SUFFIX)
        try:
            self.server_public, self.server_secret = curve_keys.load_secret(secret_file)
        except curve_keys.KeyFileError as exc:
            raise PolicyError(f"the daemon's key pair: {exc} (`libremote keygen daemon --dir {directory}` makes "
                              "DIR/server.key_secret; --server-key FILE names another)") from None
        #: z85 public key -> the identity it stands for.
        self.identities: dict[bytes, Identity] = {}
        self._read_folder(folder, TENANT)
        if (folder / ADMIN_FOLDER).is_dir():
            self._read_folder(folder / ADMIN_FOLDER, ADMIN)
        if not self.identities:
            raise PolicyError(f"--auth-keys {directory} holds no client keys (TENANT.key files); add the public "
                              "keys of your tenants (`libremote keygen client NAME` makes them)")

    def _read_folder(self, folder: Path, kind: str) -> None:
        for path in sorted(folder.glob("*" + curve_keys.PUBLIC_SUFFIX)):
            public = curve_keys.load_public(path)
            if public == self.server_public:
                continue  # the daemon's own server.key sits beside the client keys
            identity = Identity(kind, path.name.split(".", 1)[0])
            if public in self.identities and self.identities[public] != identity:
                raise PolicyError(f"{path}: the same public key also stands for {self.identities[public].user_id}")
            self.identities[public] = identity

    def tenants(self) -> set[str]:
        return {identity.name for identity in self.identities.values() if identity.kind == TENANT}

    def only_tenant(self, name: str) -> KeyRing:
        """The key ring a tenant's worker uses: the same key pair, and that tenant's keys only.
        (A worker's socket then completes no handshake with anyone else: another tenant's
        client, an admin, a scanner.)"""
        ring = object.__new__(KeyRing)
        ring.server_public, ring.server_secret = self.server_public, self.server_secret
        ring.identities = {key: who for key, who in self.identities.items() if who == Identity(TENANT, name)}
        return ring


class _KeyRingAuthenticator(ThreadAuthenticator):
    """pyzmq's ZAP handler, with each accepted key's User-Id taken from the key ring."""

    def __init__(self, context: zmq.Context[Any], keyring: KeyRing) -> None:
        super().__init__(context, log=logging.getLogger("libremote.server.zap"))
        self.keyring = keyring

    export_keys: set[bytes] = set()

    def curve_user_id(self, client_public_key: bytes) -> str:
        public = z85.encode(client_public_key)
        if public not in self.keyring.identities and public in self.export_keys:
            return EXPORT_USER_PREFIX + public.decode("ascii")
        return self.keyring.identities[public].key_user_id(public)


class _KnownKeys:
    """``configure_curve_callback``'s credentials provider: accept the key ring's keys only."""

    def __init__(self, keyring: KeyRing, export_keys: set[bytes]) -> None:
        self.keyring = keyring
        self.export_keys = export_keys
        self.refused = 0  # (for the metrics; only the ZAP thread writes it)

    def callback(self, domain: str, key: bytes) -> bool:
        known = key in self.keyring.identities or key in self.export_keys
        if not known:
            self.refused += 1
            log.warning("refused a connection with an unknown CURVE key %s", key.decode("ascii", "replace"),
                        extra={"event": "security_rejection", "reason": "unknown_key"})
        return known


def secure(socket: zmq.Socket[Any], keyring: KeyRing, *, export_keys: set[bytes] | None = None) -> ThreadAuthenticator:
    """Make ``socket`` (before it binds) a CURVE server that accepts the key ring's keys; return
    the running ZAP handler (stop it when the socket is closed). ``export_keys``: a worker's live
    exports' one-time keys (server/worker/exports.py), accepted too, as ``export:KEY`` only."""
    authenticator = _KeyRingAuthenticator(socket.context, keyring)
    authenticator.export_keys = export_keys if export_keys is not None else set()
    authenticator.start()
    authenticator.known_keys = _KnownKeys(keyring, authenticator.export_keys)  # type: ignore[attr-defined]
    authenticator.configure_curve_callback("*", authenticator.known_keys)  # type: ignore[attr-defined]
    socket.curve_server = True
    socket.curve_publickey = keyring.server_public
    socket.curve_secretkey = keyring.server_secret
    return authenticator


def user_id_of(frame: zmq.Frame) -> str | None:
    """The ZAP User-Id ZeroMQ attached to a received frame (None on plain TCP, where there is none)."""
    try:
        user_id = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    return user_id if isinstance(user_id, str) else None


#: The User-Id of a connection made with an export's one-time key: it may PULL that export, nothing else.
EXPORT_USER_PREFIX = "export:"


def export_key_of(user_id: str | None) -> bytes | None:
    """The export key (z85) a connection authenticated with, or None (a tenant's key, plain TCP)."""
    if user_id is None or not user_id.startswith(EXPORT_USER_PREFIX):
        return None
    return user_id[len(EXPORT_USER_PREFIX):].encode("ascii")


def same_owner(bound_user_id: str | None, user_id: str | None) -> bool:
    """Whether a message with ``user_id`` may act on a session opened with ``bound_user_id``."""
    return bound_user_id == user_id


# ----------------------------------------------------------------------------------------------
# Listening addresses
# ----------------------------------------------------------------------------------------------
def is_loopback_endpoint(endpoint: str) -> bool:
    """Whether a ZeroMQ bind address reaches only this host (``tcp://127.0.0.1:N``,
    ``tcp://[::1]:N``, ``tcp://localhost:N``, ``ipc://``, ``inproc://``)."""
    transport, _, rest = endpoint.partition("://")
    if transport in ("ipc", "inproc"):
        return True
    host = rest.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", an interface name, a host name: may be reachable from elsewhere


def is_loopback_peer(peer_address: str | None) -> bool:
    """Whether a ZeroMQ peer address (``Peer-Address`` of a received frame) is this host."""
    if not peer_address:
        return False
    return peer_address == "::1" or peer_address.startswith("127.") or peer_address.startswith("::ffff:127.")


# ----------------------------------------------------------------------------------------------
# Who asks: STATUS and ADMIN
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Requester:
    """Who sent a STATUS or ADMIN request: an admin (sees and changes everything), a tenant (sees
    its own sessions), anyone on a daemon without identities (``open_pool``: sees every session,
    changes nothing), or nobody the daemon knows (``refusal`` says why and what to do)."""

    is_admin: bool = False
    tenant: str | None = None
    open_pool: bool = False
    refusal: str = ""


def requester(pool: PoolConfig, user_id: str | None, request: dict[str, Any], peer_address: str | None,
              *, loopback_admin: bool) -> Requester:
    """Decide who a STATUS/ADMIN request comes from.

    With CURVE the key decides (``user_id``); credentials in the request are ignored. On plain
    TCP: the admin token (``token``) makes an admin; ``--loopback-admin`` makes any local peer
    one; a tenant's name and token (``tenant``, ``tenant_token``) make that tenant; without a
    tenants file no client has an identity (every one is the anonymous tenant), so every peer
    sees every session, as any of them could open one."""
    if user_id is not None:
        identity = Identity.from_user_id(user_id)
        if identity is None:
            return Requester(refusal=f"unknown identity {user_id!r}")
        return Requester(is_admin=True) if identity.kind == ADMIN else Requester(tenant=identity.name)
    token = request.get("token")
    if pool.admin_token and isinstance(token, str) and same_secret(pool.admin_token, token):
        return Requester(is_admin=True)
    if loopback_admin and is_loopback_peer(peer_address):
        return Requester(is_admin=True)
    if not pool.has_tenants:
        return Requester(open_pool=True)
    if request.get("tenant"):
        try:
            return Requester(tenant=pool.authenticate(request["tenant"], request.get("tenant_token")).name)
        except PolicyError:
            pass
    return Requester(refusal="not allowed: give the daemon's admin token (--token or LIBREMOTE_ADMIN_TOKEN), or "
                             "your tenant's name and token (LIBREMOTE_TENANT, LIBREMOTE_TOKEN) to see your sessions")


def admin_refusal(viewer: Requester, curve: bool) -> str:
    """Why ``viewer`` may not change the pool (ADMIN), for the reply."""
    if curve:
        return "not allowed: admin commands need an admin key (LIBREMOTE_CLIENT_KEY of a key in the daemon's --auth-keys DIR/admin)"
    return ("not allowed: give the daemon's admin token (libremote admin --token or LIBREMOTE_ADMIN_TOKEN; the "
            "tenants file's [admin] token), or start the daemon with --loopback-admin to let its own host administer it")


def visible_status(report: dict[str, Any], viewer: Requester) -> dict[str, Any]:
    """The status report as ``viewer`` may see it: all of it for an admin or on an open pool; for
    a tenant, the devices (totals only) and its own sessions and waiting clients, nothing of
    other tenants' (ids, pids, hosts)."""
    if viewer.is_admin or viewer.open_pool:
        return report
    mine = [row for row in report["sessions"] if row["tenant"] == viewer.tenant]
    waiting = [row for row in report["waiting"] if row["tenant"] == viewer.tenant]
    return {**report, "sessions": mine, "waiting": waiting}
