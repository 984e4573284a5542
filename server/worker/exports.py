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
make the worker hold unbounded host memory this way.

Under CURVE a worker lets in only its tenant's keys, and a peer daemon's worker holds none. So
each export gets its own CURVE key pair, made here: the worker's ZAP handler accepts that public
key too (as ``export:KEY``, never as a tenant), for as long as the export lives, and a connection
made with it may only PULL, and only that export. EXPORT's reply hands the key pair's secret and
this worker's server key to the client over its encrypted session; the client hands them on with
the token, over its encrypted session with B. B's worker connects with them: the pull is
encrypted, B knows it talks to A's worker, and A serves nobody without the export's secret key
and its token (SECURITY.md, "Cross-server copies under CURVE").
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

import torch
import zmq

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
    key: bytes | None = None  # under CURVE: the public key (z85) a pull must connect with


class Exports:
    """The worker's live exports, by token."""

    def __init__(self, *, allowed: bool = True, why_not: str = "", curve: bool = False) -> None:
        self._by_token: dict[bytes, Export] = {}
        self._allowed = allowed
        self._why_not = why_not
        self.curve = curve
        #: Public keys (z85) of live exports: the ZAP handler's thread reads it (a set: no lock needed).
        self.keys: set[bytes] = set()
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
        export = Export(session, memoryview(data).cast("B"), time.monotonic() + messages.EXPORT_TTL_S, snapshot)
        self._by_token[token] = export
        if self.curve:
            export.key, self.secret_of_last = zmq.curve_keypair()
            self.keys.add(export.key)
        return token, nbytes

    #: The secret key of the export :meth:`add` made last (CURVE), for EXPORT's reply only.
    secret_of_last: bytes = b""
    #: This worker's CURVE server key (z85), which a pulling worker must find at the other end.
    server_public: bytes = b""

    def serve(self, token: bytes, offset: int, length: int,
              key: bytes | None = None) -> tuple[int, memoryview | None, str | None]:
        """(total, piece, error) for a PULL, from a connection made with ``key`` (CURVE: the
        export's own). The export goes once its last byte was served."""
        export = self._find(token)
        if export is not None and export.key != key:
            export = None  # (the same answer as a wrong token: nothing about the export is told)
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
            self._drop(token)  # (the piece still refers to the snapshot: sent before it goes)
        return total, piece, None

    def _find(self, token: bytes) -> Export | None:
        if len(token) != messages.EXPORT_TOKEN_BYTES:
            return None
        export = self._by_token.get(token)
        if export is None:
            return None
        if export.expires < time.monotonic():
            self._drop(token)
            return None
        return export

    def drop_session(self, session: str) -> None:
        for token in [t for t, export in self._by_token.items() if export.session == session]:
            self._drop(token)

    def expire(self) -> None:
        now = time.monotonic()
        for token in [t for t, export in self._by_token.items() if export.expires < now]:
            self._drop(token)

    def _drop(self, token: bytes) -> None:
        export = self._by_token.pop(token, None)
        if export is not None and export.key is not None:
            self.keys.discard(export.key)

    def held_bytes(self) -> int:
        return sum(len(export.data) for export in self._by_token.values())
