"""CURVE key files: making them, reading them, and putting them on a ZeroMQ socket.

The daemon and its clients authenticate each other and encrypt everything between them with
ZeroMQ's CURVE mechanism (CurveZMQ: Curve25519 keys, per-connection session keys, forward
secrecy). Each side has a key pair; a side's *public* key is what the other side is told about:

- the daemon's public key goes to every client (``LIBREMOTE_SERVER_KEY``): a client only talks to
  the daemon that holds the matching secret key, so nobody can stand in for it;
- a client's public key goes into the daemon's ``--auth-keys`` directory, where its file name
  names the tenant (see ``server/auth.py``).

Files are pyzmq's certificate format (``zmq.auth.create_certificates``): ``NAME.key`` holds the
public key, ``NAME.key_secret`` both keys. The secret file is created readable by its owner only
(0600), and loading a secret key that others may read is refused, as ssh does: a copied secret key
lets anyone act as that tenant or that daemon.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"


class KeyFileError(ValueError):
    """A key file that is missing, malformed or unsafe; the message says which and what to do."""


def generate(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` (public, 0644) and ``NAME.key_secret`` (0600) into ``directory``.

    Refuses to overwrite existing files: replacing a key pair silently locks out whoever holds
    the old public key. The umask is tightened while writing, so the secret key is never
    readable by others, not even for an instant."""
    if not name or os.sep in name or name.startswith("."):
        raise KeyFileError(f"key name {name!r} must be a plain file name (no slashes, not hidden)")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = folder / (name + PUBLIC_SUFFIX), folder / (name + SECRET_SUFFIX)
    for path in (public, secret):
        if path.exists():
            raise KeyFileError(f"{path} exists already; remove it first or choose another name")
    previous_umask = os.umask(0o077)
    try:
        zmq.auth.create_certificates(str(folder), name)
    finally:
        os.umask(previous_umask)
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)
    return public, secret


def load_public(path: str | os.PathLike[str]) -> bytes:
    """The z85 public key in a ``.key`` (or ``.key_secret``) file."""
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read a CURVE public key from {path}: {exc} "
                           "(make one with `libremote keygen`)") from None
    return public


def load_secret(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """(public, secret) z85 keys from a ``.key_secret`` file that only its owner can read."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise KeyFileError(f"cannot read secret key file {path}: {exc.strerror} "
                           "(make one with `libremote keygen`)") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"secret key file {path} is accessible by other users (mode {stat.S_IMODE(mode):04o}): "
                           f"run `chmod 600 {path}`, and make a new key pair if others may have read it")
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read a CURVE key pair from {path}: {exc}") from None
    if secret is None:
        raise KeyFileError(f"{path} holds a public key only; give the {SECRET_SUFFIX} file of the pair")
    return public, secret


@dataclass(frozen=True)
class ClientKeys:
    """What a client needs for CURVE: its own key pair and the daemon's public key."""

    public: bytes
    secret: bytes
    server_public: bytes

    @classmethod
    def from_files(cls, client_secret_file: str | None, server_public_file: str | None) -> ClientKeys | None:
        """Keys from the two files (``LIBREMOTE_CLIENT_KEY``, ``LIBREMOTE_SERVER_KEY``), None when
        neither is given; one without the other is a configuration error, not plain TCP."""
        if not client_secret_file and not server_public_file:
            return None
        if not (client_secret_file and server_public_file):
            raise KeyFileError(
                "CURVE needs both LIBREMOTE_CLIENT_KEY (this client's .key_secret file) and "
                "LIBREMOTE_SERVER_KEY (the daemon's public .key file); only one is set")
        public, secret = load_secret(client_secret_file)
        return cls(public, secret, load_public(server_public_file))

    def apply(self, socket: zmq.Socket[Any]) -> None:
        """Make ``socket`` (before it connects) a CURVE client of the daemon with this key."""
        socket.curve_publickey = self.public
        socket.curve_secretkey = self.secret
        socket.curve_serverkey = self.server_public


#: The monitor events that say why a connection's handshake failed (see handshake_failure).
HANDSHAKE_FAILED_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                           | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


def handshake_failure(event: int, address: str, using_curve: bool) -> str | None:
    """What to tell the user for a failed ZMTP handshake (a socket monitor event), or None.

    CURVE refusals are silent at the message level: ZeroMQ just keeps reconnecting. The only
    trace is the monitor event, so the client turns it into an error that names the cause."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return (f"libremote: the daemon at {address} does not accept this client's key (LIBREMOTE_CLIENT_KEY): "
                "its public key is not in the daemon's --auth-keys directory. Send your NAME.key file "
                "(never the .key_secret) to the daemon's operator, who copies it there as TENANT.key.")
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        if using_curve:
            return (f"libremote: the daemon at {address} does not use CURVE (it runs without --auth-keys), "
                    "but this client is configured for it: unset LIBREMOTE_CLIENT_KEY and LIBREMOTE_SERVER_KEY "
                    "for that daemon, or ask its operator to start it with --auth-keys.")
        return (f"libremote: the daemon at {address} requires an authenticated, encrypted connection (CURVE): "
                "set LIBREMOTE_CLIENT_KEY to your .key_secret file (make one with `libremote keygen client NAME`) "
                "and LIBREMOTE_SERVER_KEY to the daemon's public server.key.")
    if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and using_curve:
        return (f"libremote: the CURVE handshake with the daemon at {address} failed: LIBREMOTE_SERVER_KEY is "
                "probably not that daemon's public key (or another process answers at that address). Get the "
                "daemon's server.key from its operator.")
    return None
