"""The ZeroMQ calls on every message's path, without pyzmq's Python layer.

Both ends poll ``ZMQ_EVENTS`` in their receive loops (between messages, and while spinning for a
reply). pyzmq's ``Socket.get`` wraps the answer in a ``PollEvent`` flag enum and ``& zmq.POLLIN``
is an enum operation: ~1 us more per check than the Cython getter with plain ints, spent on both
sides of every round trip. (pyzmq 27's getter still builds a ``SocketOption`` enum per call, and
libzmq's ``ZMQ_EVENTS`` polls the socket's mailbox: ~2 us a check on the 2-core VM.)

Both ends also send every message of a round trip: :func:`send_parts` is ``send_multipart``
without its per-part type checks and ``SNDMORE | flags`` enum arithmetic, straight to the Cython
``send`` (which applies ``copy_threshold`` itself): 6.8 against 10.8 us for a two-part message
on the 2-core VM.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import zmq
from zmq.backend import Socket as _BackendSocket

_get = _BackendSocket.get
_send = _BackendSocket.send
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_SNDMORE = int(zmq.SNDMORE)


def readable(socket: zmq.Socket[Any]) -> bool:
    """Whether ``socket`` has a message to receive now."""
    # (ZMQ_EVENTS is an int option; pyzmq's stubs say int | bytes. No int() here: a call per check.)
    return bool(_get(socket, _EVENTS) & _POLLIN)  # type: ignore[operator]


def send_parts(socket: zmq.Socket[Any], parts: Sequence[Any], flags: int = 0, *, copy: bool = True,
               track: bool = False) -> Any:
    """``socket.send_multipart(parts, flags, copy, track)`` (bytes, memoryviews or Frames; ``flags``
    a plain int): the last part's tracker, as pyzmq returns it."""
    more = flags | _SNDMORE
    last = len(parts) - 1
    for part in parts[:last]:
        _send(socket, part, more, copy, track)
    return _send(socket, parts[last], flags, copy, track)
