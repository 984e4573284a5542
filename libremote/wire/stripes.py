"""Striped frames: a large frame cut into CHUNKs over several connections, and put back together.

Why: ZeroMQ encrypts (CURVE) each connection in one I/O thread, so a 64 MiB frame on one
connection is encrypted and decrypted at one core's speed on each side. Cut into CHUNKs of
STRIPE_CHUNK_BYTES spread over several connections (the session's *stripes*, each handled by
its own I/O thread), the same bytes are encrypted on as many cores as there are stripes and
threads. Both ends use this module: the client for uploads and the replies it reads, the worker
for the batches it takes and the replies it sends (libremote/client/stripes.py,
server/worker/stripes.py). No torch here.

A frame travels as one transfer: its message (a BATCH or REPLY, on the session's own connection)
names ``[frame, transfer, nbytes]`` in ``striped`` and carries an empty frame in its place; the
CHUNKs ``[CHUNK, transfer, offset, nbytes] + piece`` come on the stripes. Stripes are separate
connections, so a chunk may arrive before the message that names its transfer: it is kept
(zero-copy, within a bound) until then.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .codec import ProtocolError, packb
from .messages import MAX_STRIPES, STRIPE_CHUNK_BYTES, STRIPE_MIN_BYTES, Msg


def striped(frame: Any) -> bool:
    """Whether a frame is large enough to travel striped."""
    return memoryview(frame).nbytes >= STRIPE_MIN_BYTES


#: Chunks of one frame per stripe, at most: a frame so large that STRIPE_CHUNK_BYTES pieces would
#: be more goes in larger pieces. (The daemon queues at most limits.OUTBOX_MESSAGES messages per
#: peer, and a stripe is a peer: a 1 GiB fetch in 512 KiB pieces over two stripes would be 1,024.)
MAX_CHUNKS_PER_STRIPE = 256


def pieces(frame: Any, stripes: int) -> Iterator[tuple[int, memoryview]]:
    """``(offset, piece)`` of a frame to spread over ``stripes`` connections (zero-copy views):
    STRIPE_CHUNK_BYTES each, or larger for a frame that would make more than
    MAX_CHUNKS_PER_STRIPE of them per stripe."""
    view = memoryview(frame).cast("B")
    most = max(1, stripes) * MAX_CHUNKS_PER_STRIPE
    size = max(STRIPE_CHUNK_BYTES, -(-view.nbytes // most))
    for offset in range(0, view.nbytes, size):
        yield offset, view[offset:offset + size]


def send_chunks(frames: Sequence[Any], transfers: Iterator[int], stripes: int,
                send_chunk: Callable[[list[Any]], Any]) -> tuple[list[Any], list[Any], list[Any]]:
    """Send a message's large frames as CHUNKs, each by ``send_chunk(parts)`` (which picks the
    stripe; it returns a tracker to keep, or None). Returns the message's ``striped`` entries
    (``[frame, transfer, nbytes]``, empty when nothing was large), its frames with an empty one
    in place of each striped frame, and the chunks' trackers. Both ends send this way: the
    client its uploads, the worker its replies."""
    entries: list[Any] = []
    kept: list[Any] = []
    trackers: list[Any] = []
    for index, frame in enumerate(frames, start=1):
        if not striped(frame):
            kept.append(frame)
            continue
        transfer, nbytes = next(transfers), memoryview(frame).nbytes
        for offset, piece in pieces(frame, stripes):
            tracker = send_chunk([packb([Msg.CHUNK, transfer, offset, nbytes]), piece])
            if tracker is not None:
                trackers.append(tracker)
        entries.append([index, transfer, nbytes])
        kept.append(b"")
    return entries, kept, trackers


def check_count(count: int) -> int:
    if not 0 <= count <= MAX_STRIPES:
        raise ValueError(f"stripes: {count} is not between 0 and {MAX_STRIPES}")
    return count


class Assembled:
    """A frame put back together, read like a received ``zmq.Frame`` (``.buffer``, ``.bytes``)."""

    def __init__(self, data: bytearray) -> None:
        self.buffer = memoryview(data)

    @property
    def bytes(self) -> bytes:
        return bytes(self.buffer)

    def __len__(self) -> int:
        return self.buffer.nbytes


class Assembly:
    """The striped frames one end is receiving, by transfer.

    ``max_bytes`` bounds what a peer can make this end hold: the frames it announced and has not
    finished, plus the chunks that arrived before their announcement. A peer that goes over it,
    or sends a chunk outside its frame, breaks the protocol (:class:`ProtocolError`)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._frames: dict[int, list[Any]] = {}  # transfer -> [bytearray, bytes still missing]
        self._early: dict[int, list[tuple[int, int, Any]]] = {}  # transfer -> [(offset, nbytes, piece)]
        self.held = 0  # bytes announced and not yet taken, plus early chunks

    def expect(self, transfer: int, nbytes: int) -> None:
        """A message names ``transfer``: make room for its ``nbytes`` and place what came early."""
        if type(transfer) is not int or type(nbytes) is not int or nbytes < 0:
            raise ProtocolError("striped entries are [frame, transfer, nbytes] with whole numbers")
        if transfer in self._frames:
            raise ProtocolError(f"striped transfer {transfer} was announced twice")
        early = self._early.pop(transfer, [])
        self.held -= sum(memoryview(piece).nbytes for _, _, piece in early)
        self._reserve(nbytes)
        self._frames[transfer] = [bytearray(nbytes), nbytes]
        for offset, total, piece in early:
            self._place(transfer, offset, total, piece)

    def add(self, transfer: int, offset: int, nbytes: int, piece: Any) -> None:
        """A CHUNK arrived on a stripe."""
        if transfer in self._frames:
            self._place(transfer, offset, nbytes, piece)
            return
        self._reserve(memoryview(piece).nbytes)
        self._early.setdefault(transfer, []).append((offset, nbytes, piece))

    def complete(self, transfer: int) -> bool:
        entry = self._frames.get(transfer)
        return entry is not None and entry[1] == 0

    def take(self, transfer: int) -> Assembled:
        """The finished frame (:meth:`complete`), handed over: no longer counted here."""
        data, missing = self._frames.pop(transfer)
        assert missing == 0
        self.held -= len(data)
        return Assembled(data)

    def _reserve(self, nbytes: int) -> None:
        if self.held + nbytes > self.max_bytes:
            raise ProtocolError(f"striped frames over the bound: {self.held + nbytes} bytes held, at most "
                                f"{self.max_bytes} (chunks without their message, or frames never finished)")
        self.held += nbytes

    def _place(self, transfer: int, offset: int, nbytes: int, piece: Any) -> None:
        entry = self._frames[transfer]
        data = entry[0]
        view = memoryview(piece).cast("B")
        if nbytes != len(data) or offset < 0 or offset + view.nbytes > len(data) or view.nbytes == 0:
            raise ProtocolError(f"CHUNK of transfer {transfer} ({view.nbytes} bytes at {offset} of {nbytes}) does "
                                f"not fit its frame of {len(data)} bytes")
        data[offset:offset + view.nbytes] = view
        entry[1] -= view.nbytes
        if entry[1] < 0:
            raise ProtocolError(f"transfer {transfer} got more chunks than its frame holds")
