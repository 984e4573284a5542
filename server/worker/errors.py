"""The errors a command of a session ends with (reported in the next REPLY, like CUDA's)."""

from __future__ import annotations

from libremote_wire.messages import ErrorKind


class CommandError(Exception):
    """A command failed; ``kind`` is an :class:`ErrorKind`, ``op`` names what failed."""

    def __init__(self, kind: ErrorKind, op: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.op = op
        self.message = message

    def to_wire(self) -> list[str]:
        return [self.kind.value, self.op, self.message]


class QuotaRefusal(CommandError):
    """An op refused before it ran: what it would allocate does not fit in the session's quota."""
