"""Exceptions raised by the libremote client.

Every failure that reaches user code says what happened and what to do about it. Errors from
the daemon keep torch's own types where code already catches them: running out of device memory
raises :class:`torch.OutOfMemoryError` (so ``except torch.cuda.OutOfMemoryError`` works).
"""

from __future__ import annotations

import torch


class LibremoteError(RuntimeError):
    """Base class of libremote's own errors."""


class NotConfiguredError(LibremoteError):
    """No daemon address was given."""


class ConnectionFailed(LibremoteError):
    """The daemon could not be reached, refused the client, or went away."""


class Refused(ConnectionFailed):
    """A daemon refused the client's HELLO. ``kind`` is the daemon's word for why (REFUSED's
    ``kind``: ``draining``, ``unhealthy``, ``reservation``, ...; empty from an older daemon), so
    that the pool's resolver can tell a placement gone stale (place again, elsewhere) from a
    refusal that placing again cannot cure; ``address`` is the daemon's."""

    def __init__(self, message: str, *, address: str = "", kind: str = "") -> None:
        super().__init__(message)
        self.address = address
        self.kind = kind


class CaptureError(LibremoteError):
    """Something in a step given to ``libremote.capture_step`` cannot be replayed by the daemon."""


class RemoteOpError(LibremoteError):
    """An op failed on the daemon. ``kind``: what failed (see ``messages.ErrorKind``)."""

    def __init__(self, kind: str, op: str, message: str) -> None:
        self.kind = kind
        self.op = op
        self.remote_message = message
        where = f" in {op}" if op else ""
        super().__init__(f"libremote: the daemon reported an error{where}: {message}")


class RemoteOutOfMemoryError(torch.OutOfMemoryError, LibremoteError):
    """The daemon ran out of device memory (or the session hit its quota)."""

    def __init__(self, op: str, message: str) -> None:
        self.kind = "oom"
        self.op = op
        self.remote_message = message
        super().__init__(f"libremote: out of memory on the daemon in {op}: {message}")


def from_wire(error: list[str]) -> LibremoteError:
    """Turn REPLY.error = [kind, op, message] into the exception to raise."""
    kind, op, message = (list(error) + ["", "", ""])[:3]
    if kind == "oom":
        return RemoteOutOfMemoryError(op, message)
    if kind == "session":
        return ConnectionFailed(f"libremote: {message}")
    return RemoteOpError(kind, op, message)
