"""Sending to peers without ever waiting for one.

The daemon has one thread for every session. A blocking send to a peer that does not read (a
client that floods requests and never reads the replies, or a host that vanished) would park that
thread, and with it every session, for good. So every send here is non-blocking, and each peer's
queue of messages not yet taken by the network is bounded (ZeroMQ's SNDHWM on the ROUTER socket,
:data:`~.limits.OUTBOX_MESSAGES`). A peer whose queue is full is reported to the daemon, which ends
its session; nobody else notices.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import zmq

from libremote_wire.zmq_events import send_parts

from . import limits

_NOBLOCK = int(zmq.NOBLOCK)

log = logging.getLogger("libremote.server")


def configure(socket: zmq.Socket[Any]) -> None:
    """Options of the daemon's ROUTER socket that the outbox relies on (set before binding)."""
    # Unroutable messages raise (EHOSTUNREACH) instead of vanishing; a full queue raises zmq.Again.
    socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
    socket.setsockopt(zmq.SNDHWM, limits.OUTBOX_MESSAGES)


class Outbox:
    """Non-blocking sends on a ROUTER socket; ``on_full(identity)`` when a peer's queue is full."""

    def __init__(self, socket: zmq.Socket[Any], on_full: Callable[[bytes], None]) -> None:
        self._socket = socket
        self._on_full = on_full
        self.dropped = 0  # messages for peers that could not take them (gone, or not reading)

    def send(self, identity: bytes, parts: list[Any], *, copy: bool = True, track: bool = False) -> Any:
        """Queue ``parts`` for the peer ``identity``; False when it could not take them. With
        ``track`` (zero-copy frames only), a ``zmq.MessageTracker`` that is done once ZeroMQ has
        let go of the frames (they went to the network), else True."""
        try:
            tracker = send_parts(self._socket, [identity, *parts], _NOBLOCK, copy=copy, track=track)
            return tracker if track else True
        except zmq.Again:
            self.dropped += 1
            self._on_full(identity)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the peer is gone; nothing to deliver
            self.dropped += 1
            log.debug("could not send to %s: %s", identity.hex()[:12], exc)
        return False
