"""A session's stripes in the worker: extra connections of its client that carry large frames.

Why: under CURVE each connection is encrypted by one ZeroMQ I/O thread, so a session's bulk data
would move at one core's speed (libremote_wire.stripes). The client opens a few more
connections to this worker and announces each with STRIPE and its session's routing id.

Security: a stripe is accepted only when its ZAP User-Id, which names the CURVE key it
authenticated with (server/auth.py), is the session's owner: the session's own key, not merely
its tenant. Anything else (no such session, another key, a plain-TCP daemon, too many stripes)
is refused, logged as a security rejection and counted (``rejected["stripe"]``). A stripe only
ever feeds its own session's frames and receives its own session's replies.

Ordering: a BATCH that names striped frames waits here until their CHUNKs are in, and the
session's batches after it wait behind it, so commands still run in the order they were sent.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from libremote_wire import codec, messages
from libremote_wire import stripes as wire_stripes
from libremote_wire.codec import ProtocolError

from .. import limits

#: A batch held until its striped frames are in: (seq, commands, want_reply, frames, striped).
Held = tuple[int, list[Any], bool, list[Any], list[Any]]


@dataclass
class _SessionStripes:
    identities: list[bytes] = field(default_factory=list)
    assembly: wire_stripes.Assembly = field(
        default_factory=lambda: wire_stripes.Assembly(limits.MAX_QUEUED_BYTES))
    held: collections.deque[Held] = field(default_factory=collections.deque)
    next_stripe: int = 0


class StripeTable:
    """Which connection is a stripe of which session, and what each session is receiving."""

    def __init__(self) -> None:
        self._session_of: dict[bytes, bytes] = {}  # stripe routing id -> session routing id
        self._sessions: dict[bytes, _SessionStripes] = {}
        self._transfers = itertools.count(1)

    def session_of(self, stripe: bytes) -> bytes | None:
        return self._session_of.get(stripe)

    def attach(self, stripe: bytes, session: bytes) -> str | None:
        """Make ``stripe`` one of ``session``'s (its owner checked by the caller); why not, or None."""
        if stripe in self._session_of or stripe == session:
            return "this connection is a stripe or a session already"
        entry = self._sessions.setdefault(session, _SessionStripes())
        if len(entry.identities) >= messages.MAX_STRIPES:
            return f"a session has at most {messages.MAX_STRIPES} stripes"
        entry.identities.append(stripe)
        self._session_of[stripe] = session
        return None

    def forget_stripe(self, stripe: bytes) -> None:
        session = self._session_of.pop(stripe, None)
        if session is not None and session in self._sessions:
            self._sessions[session].identities.remove(stripe)

    def forget_session(self, session: bytes) -> list[bytes]:
        """Drop a session's stripes and what it was receiving; return the stripes' routing ids."""
        entry = self._sessions.pop(session, None)
        if entry is None:
            return []
        for stripe in entry.identities:
            self._session_of.pop(stripe, None)
        return entry.identities

    # ------------------------------------------------------------------------------------------
    # Receiving
    # ------------------------------------------------------------------------------------------
    def waiting(self, session: bytes) -> bool:
        entry = self._sessions.get(session)
        return entry is not None and bool(entry.held)

    def hold(self, session: bytes, batch: Held) -> list[Held]:
        """A BATCH with striped frames, or one behind such a batch; return the batches now ready."""
        entry = self._sessions.get(session)
        if entry is None or not entry.identities:
            raise ProtocolError("a BATCH named striped frames, but this session has no stripes (send STRIPE first)")
        for item in batch[4]:
            codec.check(type(item) is list and len(item) == 3 and type(item[0]) is int
                        and 0 < item[0] <= len(batch[3]), lambda: "striped entries are [frame, transfer, nbytes]")
            entry.assembly.expect(item[1], item[2])
        entry.held.append(batch)
        return self._ready(entry)

    def add_chunk(self, session: bytes, transfer: int, offset: int, nbytes: int, piece: Any) -> list[Held]:
        """A CHUNK on one of ``session``'s stripes; return the batches it made ready."""
        entry = self._sessions[session]
        entry.assembly.add(transfer, offset, nbytes, piece)
        return self._ready(entry)

    @staticmethod
    def _ready(entry: _SessionStripes) -> list[Held]:
        ready: list[Held] = []
        while entry.held and all(entry.assembly.complete(item[1]) for item in entry.held[0][4]):
            seq, commands, want_reply, frames, striped = entry.held.popleft()
            frames = list(frames)
            for index, transfer, _ in striped:
                frames[index - 1] = entry.assembly.take(transfer).buffer
            ready.append((seq, commands, want_reply, frames, []))
        return ready

    # ------------------------------------------------------------------------------------------
    # Sending
    # ------------------------------------------------------------------------------------------
    def send_large(self, session: bytes, header: list[Any], frames: Sequence[Any],
                   send: Callable[[bytes, list[Any], bool], Any], *, track: bool) -> tuple[list[Any], list[Any], list[Any]]:
        """Send a reply's large frames as CHUNKs on ``session``'s stripes (``send(stripe, parts,
        track)``); return the reply's header (``striped`` added), its frames (empty in their
        place) and the chunks' trackers. Without stripes, or nothing large, all unchanged."""
        entry = self._sessions.get(session)
        if entry is None or not entry.identities or not any(wire_stripes.striped(frame) for frame in frames):
            return header, list(frames), []
        live, identities = entry, entry.identities  # (``live``: not Optional inside the closure)

        def send_chunk(parts: list[Any]) -> Any:
            stripe = identities[live.next_stripe % len(identities)]
            live.next_stripe += 1
            sent = send(stripe, parts, track)
            return sent if track and sent is not True and sent is not False else None

        striped, kept, trackers = wire_stripes.send_chunks(frames, self._transfers, len(identities), send_chunk)
        return [*header, striped], kept, trackers
