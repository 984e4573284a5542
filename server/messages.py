"""Checks on the fields of messages the daemon takes before any session exists: BATCH's envelope,
HELLO's client info, STATUS's credentials and ADMIN's request.

Every field comes from the network and may hold anything msgpack can carry: extension values
where integers belong, 1000-deep nesting, megabytes of text. What the daemon keeps (a session's
client info, shown by STATUS) or sends back (a REPLY's seq) must be what it expects, so each field
is checked here, on arrival, and only sanitized copies go further. (The commands inside a BATCH are
checked where they run, server/session.py.)
"""

from __future__ import annotations

from typing import Any

from libremote.protocol import Msg, ProtocolError, check

from .pool import PolicyError

#: HELLO's fields: name -> (allowed types, longest text). Every field may be missing or None (a
#: client without a tenant sends tenant=None: the copy leaves it out); unknown fields are dropped.
_TEXT = 256
HELLO_FIELDS: dict[str, tuple[tuple[type, ...], int]] = {
    "protocol": ((int,), 0),
    "libremote": ((str,), 64),
    "torch": ((str,), 64),
    "python": ((str,), 64),
    "pid": ((int,), 0),
    "host": ((str,), _TEXT),
    "argv": ((str,), 1024),  # (the client sends at most 200 characters)
    "tenant": ((str,), _TEXT),
    "token": ((str,), 4096),
    "priority": ((str,), 16),
    "devices": ((int,), 0),
}
#: STATUS's credentials on plain TCP (server/auth.py: the admin token, or a tenant's name and token).
STATUS_FIELDS: dict[str, tuple[tuple[type, ...], int]] = {
    "token": ((str,), 4096),
    "tenant": ((str,), _TEXT),
    "tenant_token": ((str,), 4096),
}
#: ADMIN's request fields, the same way (libremote admin sends sizes and weights as text or numbers).
ADMIN_FIELDS: dict[str, tuple[tuple[type, ...], int]] = {
    "token": ((str,), 4096),
    "tenant_token": ((str,), 4096),
    "session": ((str,), 64),
    "tenant": ((str,), _TEXT),
    "memory_quota": ((int, str), 64),
    "weight": ((int, float, str), 64),
    "priority": ((str,), 16),
}


def batch_envelope(header: list[Any]) -> tuple[int, Any, bool]:
    """A BATCH's (seq, commands, want_reply); :class:`ProtocolError` unless seq is an integer
    (it goes back in the REPLY) and want_reply a boolean."""
    check(len(header) == 4, "BATCH is [BATCH, seq, commands, want_reply]")
    _, seq, commands, want_reply = header
    check(type(seq) is int, "BATCH seq must be an integer")
    check(type(want_reply) is bool, "BATCH want_reply must be true or false")
    return seq, commands, want_reply


def batch_seq(header: Any) -> int | None:
    """The seq to answer a malformed message with: a BATCH's, when it is an integer."""
    if type(header) is list and len(header) > 1 and header[0] == Msg.BATCH and type(header[1]) is int:
        return header[1]
    return None


def hello_info(info: dict[Any, Any]) -> dict[str, Any]:
    """A sanitized copy of HELLO's info; :class:`PolicyError` (the client is refused, told why)
    for a field of the wrong type or length."""
    return _fields(info, HELLO_FIELDS, "HELLO")


def admin_request(request: dict[Any, Any]) -> dict[str, Any]:
    """A sanitized copy of ADMIN's request; :class:`PolicyError` for a malformed field."""
    return _fields(request, ADMIN_FIELDS, "ADMIN")


def status_credentials(credentials: dict[Any, Any]) -> dict[str, Any]:
    """A sanitized copy of STATUS's credentials; :class:`PolicyError` for a malformed field."""
    return _fields(credentials, STATUS_FIELDS, "STATUS")


def _fields(given: dict[Any, Any], spec: dict[str, tuple[tuple[type, ...], int]], what: str) -> dict[str, Any]:
    kept: dict[str, Any] = {}
    for name, (types, longest) in spec.items():
        value = given.get(name)
        if value is None:
            continue
        if type(value) not in types:
            expected = " or ".join("text" if t is str else "an integer" if t is int else "a number" for t in types)
            raise PolicyError(f"{what} field {name!r} must be {expected}, not a {type(value).__name__}")
        if type(value) is str and len(value) > longest:
            raise PolicyError(f"{what} field {name!r} is {len(value)} characters long; at most {longest} are accepted")
        kept[name] = value
    return kept


__all__ = ["ADMIN_FIELDS", "HELLO_FIELDS", "STATUS_FIELDS", "ProtocolError", "admin_request", "batch_envelope", "batch_seq", "hello_info", "status_credentials"]
