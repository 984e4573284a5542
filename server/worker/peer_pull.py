"""Pulling an export from another daemon's worker: the receiving half of a cross-server copy.

A PULL command (see :mod:`.exports` for the whole path) makes this worker ask the exporting
worker for the bytes, piece by piece (``messages.PULL_CHUNK_BYTES``), over a DEALER socket opened
for the one transfer. The session's next command needs the tensor, so the pull runs to its end
before the loop goes on; while it waits, the loop still answers PULLs addressed to this worker
(``serve_own``): two workers pulling from each other at once would otherwise wait for each other
until the timeout.

The address comes from the client, so it is checked: only ``tcp://host:port`` (never ipc://, which
could name this daemon's private control socket, nor inproc://), and every answer is bounded: a
piece must be the one asked for and no larger, the total must be the size the client announced.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from libremote_wire import codec, messages
from libremote_wire.codec import ProtocolError
from libremote_wire.messages import Msg

#: How long one piece may take to arrive before the copy fails (a dead or unreachable peer).
PIECE_TIMEOUT_S = 30.0
_POLL_MS = 20
#: Pieces asked for ahead of the one being received (answers come in order on one connection).
PULL_WINDOW = 2
_TCP_ADDRESS = re.compile(r"^tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+):\d{1,5}$")


class PullFailed(Exception):
    """The bytes could not be pulled; the message names the peer and what to do."""


def check_address(address: str) -> None:
    if not isinstance(address, str) or len(address) > messages.MAX_PEER_ADDRESS or not _TCP_ADDRESS.match(address):
        raise PullFailed(f"a cross-server copy may pull only from a tcp://host:port address, not {codec.brief(address)}")


def pull(context: zmq.Context[Any], address: str, token: bytes, nbytes: int, into: memoryview,
         serve_own: Callable[[], None] | None = None, curve: tuple[bytes, ...] | None = None) -> int:
    """Fill ``into`` (``nbytes`` long) with the export ``token`` of the worker at ``address``;
    return the bytes received. ``curve``: (the export's secret key, the exporting worker's
    server key), z85, when the exporting daemon runs with --auth-keys (exports.py)."""
    check_address(address)
    socket = context.socket(zmq.DEALER)
    if curve is not None:
        secret, server_public = curve
        socket.curve_secretkey = secret
        socket.curve_publickey = zmq.curve_public(secret)
        socket.curve_serverkey = server_public
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.MAXMSGSIZE, messages.PULL_CHUNK_BYTES + (64 << 10))
    # A peer that refuses the connection or drops it fails the copy at once, not after the timeout.
    monitor = socket.get_monitor_socket(zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_DISCONNECTED
                                        | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
    try:
        socket.connect(address)
        pieces = [(offset, min(messages.PULL_CHUNK_BYTES, nbytes - offset))
                  for offset in range(0, nbytes, messages.PULL_CHUNK_BYTES)] or [(0, 0)]
        asked = 0
        for position, (offset, length) in enumerate(pieces):
            # Keep PULL_WINDOW pieces asked for: the peer sends the next while this one is copied.
            while asked < len(pieces) and asked - position < PULL_WINDOW:
                socket.send(codec.packb([Msg.PULL, token, *pieces[asked]]))
                asked += 1
            header, piece = _answer(socket, monitor, address, serve_own)
            got_offset, total, error = messages.parse(header, messages.MESSAGES, accepted=frozenset({Msg.PULLED}),
                                                      at="a pulling worker")[1]
            if error is not None:
                raise PullFailed(f"the worker at {address} would not give the export: {error}")
            if total != nbytes or got_offset != offset or piece is None or len(piece) != length:
                raise PullFailed(f"the worker at {address} answered with another piece or size than asked "
                                 f"(offset {got_offset}, total {total}, {0 if piece is None else len(piece)} bytes; "
                                 f"asked offset {offset}, {length} bytes of {nbytes})")
            if length:
                into[offset:offset + length] = piece
        return nbytes
    except ProtocolError as exc:
        raise PullFailed(f"the worker at {address} answered a PULL with a malformed message: {exc}") from None
    finally:
        socket.disable_monitor()
        monitor.close(0)
        socket.close(0)


def _answer(socket: zmq.Socket[Any], monitor: zmq.Socket[Any], address: str,
            serve_own: Callable[[], None] | None) -> tuple[list[Any], memoryview | None]:
    deadline = time.monotonic() + PIECE_TIMEOUT_S
    while not socket.poll(_POLL_MS, zmq.POLLIN):
        if serve_own is not None:
            serve_own()
        while monitor.poll(0):
            event = recv_monitor_message(monitor)["event"]
            if event in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
                raise PullFailed(f"the worker at {address} refused this pull's CURVE handshake (the export's key "
                                 "expired or was used, or the daemons disagree on CURVE)")
            if event in (zmq.EVENT_CONNECT_RETRIED, zmq.EVENT_DISCONNECTED):
                raise PullFailed(f"the worker at {address} is gone (its daemon stopped or died, or the connection "
                                 "was refused): the tensor could not be copied from it")
        if time.monotonic() > deadline:
            raise PullFailed(f"the worker at {address} did not answer a PULL within {PIECE_TIMEOUT_S:g} s "
                             "(its daemon stopped, or it is unreachable from this daemon)")
    frames = socket.recv_multipart(copy=False)
    header = codec.unpackb(frames[0].buffer, max_bytes=4096)
    return header, frames[1].buffer if len(frames) > 1 else None
