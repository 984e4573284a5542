"""Exports: tensor bytes a session offers, once, to another daemon's worker (a cross-server copy).

A program with devices on two daemons moves a tensor from daemon A to daemon B without its bytes
passing through the client (libremote/client/transfer.py): the client sends EXPORT to its worker
on A, which snapshots the tensor's bytes into host memory here and answers with a random token;
the client sends PULL (with the token and A's worker address) to its worker on B, which asks A's
worker for the bytes, piece by piece (Msg.PULL, :mod:`.peer_pull`), and stores them as a new
tensor.

Why a snapshot, taken when EXPORT runs: the client's stream to A goes on after the EXPORT (an
in-place update of the tensor may follow at once), so the bytes B gets must be the ones the
tensor held at that point in A's command order, whenever B asks. Why host memory: the pull is
served between slices by the worker's loop, from bytes that no later command can touch or spill.

Security: the token (``messages.EXPORT_TOKEN_BYTES`` random bytes) is the capability. Only the
exporting session's client learns it (in its REPLY), and it hands it to its own session on B. A
PULL needs no session (B's worker has none here), but it gets nothing without a live token, and
an export is served once (dropped after its last byte went), expires after
``messages.EXPORT_TTL_S``, and dies with its session. A session may hold at most
``messages.MAX_EXPORTS`` exports of ``messages.MAX_EXPORT_BYTES`` together, so a client cannot
make the worker hold unbounded host memory this way. Under CURVE only the tenant's own keys may
connect to a worker, and a peer worker holds none of them: EXPORT is refused there (see
:meth:`Exports.add`) rather than opening a keyless way in.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

import torch

from libremote_wire import messages, torch_codec


class ExportRefused(Exception):
    """An EXPORT this worker will not take (a bound, CURVE); the message says what to do."""


@dataclass
class Export:
    session: str
    data: memoryview  # the snapshot's bytes
    expires: float
    keep: torch.Tensor = field(repr=False)  # owns the memory ``data`` views
    served: int = 0  # bytes already sent (an export is pulled once, front to back)


class Exports:
    """The worker's live exports, by token."""

    def __init__(self, *, allowed: bool = True, why_not: str = "") -> None:
        self._by_token: dict[bytes, Export] = {}
        self._allowed = allowed
        self._why_not = why_not
        self.bytes_served = 0

    def add(self, session: str, tensor: torch.Tensor) -> tuple[bytes, int]:
        """Snapshot ``tensor`` (dense) for one pull; return (token, nbytes)."""
        if not self._allowed:
            raise ExportRefused(self._why_not)
        self.expire()
        mine = [export for export in self._by_token.values() if export.session == session]
        nbytes = tensor.numel() * tensor.element_size()
        held = sum(len(export.data) for export in mine)
        if len(mine) >= messages.MAX_EXPORTS:
            raise ExportRefused(f"this session already has {len(mine)} exports that no daemon pulled (at most "
                                f"{messages.MAX_EXPORTS}); they expire after {messages.EXPORT_TTL_S:g} s")
        if held + nbytes > messages.MAX_EXPORT_BYTES:
            raise ExportRefused(f"exporting {nbytes} bytes would make this session's unpulled exports "
                                f"{held + nbytes} bytes (at most {messages.MAX_EXPORT_BYTES}); copy in smaller pieces")
        snapshot = tensor.detach().resolve_conj().resolve_neg().to("cpu", copy=True).contiguous().reshape(-1)
        data = torch_codec.tensor_bytes(snapshot) if nbytes else memoryview(b"")
        token = secrets.token_bytes(messages.EXPORT_TOKEN_BYTES)
        self._by_token[token] = Export(session, memoryview(data).cast("B"), time.monotonic() + messages.EXPORT_TTL_S,
                                       snapshot)
        return token, nbytes

    def serve(self, token: bytes, offset: int, length: int) -> tuple[int, memoryview | None, str | None]:
        """(total, piece, error) for a PULL. The export goes once its last byte was served."""
        export = self._find(token)
        if export is None:
            return 0, None, "no such export here (a wrong token, or it expired, was pulled already, or its session ended)"
        total = len(export.data)
        if not (0 <= offset <= total and 0 <= length <= messages.PULL_CHUNK_BYTES and offset + length <= total):
            return 0, None, f"bytes {offset}..{offset + length} are not a piece of at most " \
                            f"{messages.PULL_CHUNK_BYTES} bytes of this {total}-byte export"
        piece = export.data[offset:offset + length]
        export.served = max(export.served, offset + length)
        self.bytes_served += length
        if export.served >= total:
            del self._by_token[token]  # (the piece still refers to the snapshot: sent before it goes)
        return total, piece, None

    def _find(self, token: bytes) -> Export | None:
        if len(token) != messages.EXPORT_TOKEN_BYTES:
            return None
        export = self._by_token.get(token)
        if export is None:
            return None
        if export.expires < time.monotonic():
            self._by_token.pop(token, None)
            return None
        return export

    def drop_session(self, session: str) -> None:
        for token in [t for t, export in self._by_token.items() if export.session == session]:
            del self._by_token[token]

    def expire(self) -> None:
        now = time.monotonic()
        for token in [t for t, export in self._by_token.items() if export.expires < now]:
            del self._by_token[token]

    def held_bytes(self) -> int:
        return sum(len(export.data) for export in self._by_token.values())
