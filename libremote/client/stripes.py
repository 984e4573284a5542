"""The client's stripes: extra CURVE connections to its worker that carry large frames.

Layer 1, the session: used by ``connection`` only.

Under CURVE, one connection is encrypted by one ZeroMQ I/O thread, so bulk data moves at one
core's speed (benchmarks/README.md, "CURVE"). A :class:`Stripes` opens ``count`` more DEALER
connections to the session's worker with the same key, each announced with STRIPE and the
session's routing id; the worker accepts them from the session's own key only
(server/worker/stripes.py). Then a frame of STRIPE_MIN_BYTES or more goes as CHUNKs spread over
the stripes, the message that holds it on the session's connection as before; replies with large
frames come back the same way. Small messages (a round trip) never touch the stripes.

A worker that refuses the stripes (an older daemon, a bound) costs nothing but speed: the
connection sends everything on its own socket and says why once, on stderr.
"""

from __future__ import annotations

import itertools
import secrets
import sys
import time
from typing import Any

import zmq

from libremote_wire import codec, curve_keys, messages, torch_codec
from libremote_wire import stripes as wire_stripes
from libremote_wire.messages import Msg

from ..errors import ConnectionFailed

#: How long the stripes may take to be accepted before the first large frame goes without them.
_ACCEPT_WAIT_S = 5.0
_POLL_SLICE_MS = 100
#: Frames of replies this client may be putting together at once (one reply at a time, in fact).
_MAX_ASSEMBLY_BYTES = 1 << 31


class Stripes:
    def __init__(self, context: zmq.Context, address: str, session_routing_id: bytes, count: int, *,
                 curve: curve_keys.ClientKeys, heartbeat_s: float) -> None:
        self.count = wire_stripes.check_count(count)
        self.sockets: list[zmq.Socket] = []
        for _ in range(count):
            socket = context.socket(zmq.DEALER)
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.ROUTING_ID, secrets.token_bytes(16))
            socket.setsockopt(zmq.SNDHWM, 0)
            socket.setsockopt(zmq.RCVHWM, 0)
            socket.setsockopt(zmq.HEARTBEAT_IVL, int(heartbeat_s * 1000))
            socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(heartbeat_s * 3000))
            curve.apply(socket)
            socket.connect(address)
            socket.send(codec.packb([Msg.STRIPE, session_routing_id]))
            self.sockets.append(socket)
        self._accepted: bool | None = None  # None: not asked yet
        self.refusal: str | None = None
        self._transfers = itertools.count(1)
        self._next = 0
        self._assembly = wire_stripes.Assembly(_MAX_ASSEMBLY_BYTES)
        #: Frame bytes that went / came over the stripes (shown by tests and benchmarks/curve.py).
        self.bytes_sent = self.bytes_received = 0

    def usable(self) -> bool:
        """Whether the worker took every stripe (asked once, on the first large frame)."""
        if self._accepted is None:
            self._accepted = self._wait_accepted()
            if not self._accepted:
                print(f"libremote: large frames go without stripes: {self.refusal}", file=sys.stderr)
        return self._accepted

    def _wait_accepted(self) -> bool:
        deadline = time.monotonic() + _ACCEPT_WAIT_S
        for socket in self.sockets:
            if not socket.poll(max(1, int((deadline - time.monotonic()) * 1000)), zmq.POLLIN):
                self.refusal = f"the worker did not accept the stripes within {_ACCEPT_WAIT_S:g} s"
                return False
            header = codec.unpackb(socket.recv())
            if type(header) is not list or not header or header[0] != Msg.STRIPE:
                self.refusal = f"the worker refused them ({header[1] if len(header) > 1 else header})"
                return False
        return True

    # ------------------------------------------------------------------------------------------
    def send(self, header: list[Any], frames: list[Any], *, track: bool) -> tuple[list[Any], list[Any], list[Any]]:
        """Send the large frames of a message as CHUNKs; return the message to send on the
        session's connection (``striped`` added, empty frames in their place) and the trackers."""
        def send_chunk(parts: list[Any]) -> Any:
            socket = self.sockets[self._next]
            self._next = (self._next + 1) % self.count
            sent = socket.send_multipart(parts, copy=False, track=track)
            return sent if track else None

        striped, kept, trackers = wire_stripes.send_chunks(frames, self._transfers, self.count, send_chunk)
        self.bytes_sent += sum(nbytes for _, _, nbytes in striped)
        return [*header, striped] if striped else header, kept, trackers

    def receive(self, striped: list[Any], frames: list[Any], broken: Any) -> list[Any]:
        """The frames of a reply with ``striped`` entries, put together from the stripes.
        ``broken()`` says why to give up (the session's connection was lost), or None."""
        if type(striped) is not list or not self.usable():  # (usable: reads the acceptances first)
            raise ConnectionFailed("libremote: the worker sent a malformed striped reply")
        for entry in striped:
            self._assembly.expect(entry[1], entry[2])
        poller = zmq.Poller()
        for socket in self.sockets:
            poller.register(socket, zmq.POLLIN)
        while not all(self._assembly.complete(entry[1]) for entry in striped):
            ready = dict(poller.poll(_POLL_SLICE_MS))
            for socket in self.sockets:
                while socket in ready and socket.poll(0, zmq.POLLIN):
                    parts = socket.recv_multipart(copy=False)
                    header = torch_codec.unpackb(parts[0].buffer)
                    if len(parts) != 2 or header[0] != Msg.CHUNK:
                        raise ConnectionFailed(f"libremote: the worker sent {header[0]} on a stripe")
                    self._assembly.add(header[1], header[2], header[3], parts[1].buffer)
            why = broken()
            if why:
                raise ConnectionFailed(why)
        result = list(frames)
        for index, transfer, nbytes in striped:
            result[index - 1] = self._assembly.take(transfer)
            self.bytes_received += nbytes
        return result

    def close(self, linger_ms: int = 0) -> None:
        for socket in self.sockets:
            socket.close(linger_ms)


def stripe_count(requested: int, welcome: dict[str, Any]) -> int:
    """How many stripes to open: what LIBREMOTE_STRIPES asks, when the daemon has the feature."""
    if "stripes" not in welcome.get("features", ()):
        return 0
    return min(requested, messages.MAX_STRIPES)
