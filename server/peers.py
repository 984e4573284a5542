"""Knowing at once when a client's connection closes, and capping connections per address.

A ROUTER socket tells its owner nothing when a peer goes away (libzmq's ``ROUTER_NOTIFY`` is a
draft option, absent from released builds). So each listening socket of the daemon has a
monitor: it reports, per connection, ``ACCEPTED`` and ``DISCONNECTED`` with the connection's file
descriptor, and every received message carries the descriptor it came in on (``ZMQ_SRCFD``). A
routing id is bound to the descriptor of its messages; when that descriptor's connection closes,
:meth:`Peers.closed` names the routing id, and its session is reclaimed then, not after a
heartbeat timeout. A killed client's kernel closes its sockets, so that is milliseconds.

Descriptors are reused: a new connection may get the number of one that just closed. Events come
from the monitor in the order they happened, and a connection's ``ACCEPTED`` is queued before any
of its messages can be received; so before binding a routing id to a descriptor the monitor is
read up to now, and each binding carries the descriptor's *generation* (how many connections it
has carried): a close ends only the bindings of its own generation.

The same events cap the connections from one address (:data:`~.limits.CONNECTIONS_PER_ADDRESS`):
beyond it, a new connection is shut down at once, before its handshake, so one host cannot take
every descriptor of the daemon.
"""

from __future__ import annotations

import collections
import logging
import socket as socket_module
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from libremote_wire.zmq_events import readable

log = logging.getLogger("libremote.server")


class Peers:
    """Connections of one listening socket: which routing id is on which, and which closed."""

    def __init__(self, socket: zmq.Socket[Any], *, per_address: int | None = None) -> None:
        self.monitor = socket.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self._per_address = per_address
        self._generation: dict[int, int] = collections.defaultdict(int)
        self._binding: dict[bytes, tuple[int, int]] = {}  # routing id -> (fd, generation)
        self._on_fd: dict[tuple[int, int], set[bytes]] = collections.defaultdict(set)
        self._address_of: dict[tuple[int, int], str] = {}
        self._per_host: collections.Counter[str] = collections.Counter()
        self._closed: list[bytes] = []
        self.refused = 0  # connections shut down for the per-address cap

    def seen(self, routing_id: bytes, frame: zmq.Frame) -> None:
        """A message from ``routing_id`` arrived on ``frame``'s connection (cheap when known)."""
        try:
            fd = frame.get(zmq.SRCFD)
        except zmq.ZMQError:
            return
        binding = self._binding.get(routing_id)
        if binding is not None and binding[0] == fd and binding[1] == self._generation[fd]:
            return
        self._read_events()  # (the descriptor may be a reused one: see the module's docstring)
        if binding is not None:
            self._on_fd[binding].discard(routing_id)
        binding = self._binding[routing_id] = (fd, self._generation[fd])
        self._on_fd[binding].add(routing_id)

    def closed(self) -> list[bytes]:
        """Routing ids whose connection closed since the last call."""
        self._read_events()
        gone, self._closed = self._closed, []
        return gone

    def forget(self, routing_id: bytes) -> None:
        binding = self._binding.pop(routing_id, None)
        if binding is not None:
            self._on_fd[binding].discard(routing_id)

    def close(self, socket: zmq.Socket[Any]) -> None:
        try:
            socket.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(0)

    def _read_events(self) -> None:
        while readable(self.monitor):  # (one C call: this runs every turn of a worker's loop)
            event = recv_monitor_message(self.monitor)
            fd = int(event["value"])
            if event["event"] == zmq.EVENT_ACCEPTED:
                self._generation[fd] += 1
                self._accepted(fd)
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                key = (fd, self._generation[fd])
                for routing_id in self._on_fd.pop(key, ()):
                    if self._binding.get(routing_id) == key:
                        del self._binding[routing_id]
                        self._closed.append(routing_id)
                host = self._address_of.pop(key, None)
                if host is not None:
                    self._per_host[host] -= 1
                    if self._per_host[host] <= 0:
                        del self._per_host[host]

    def _accepted(self, fd: int) -> None:
        if self._per_address is None:
            return
        host = _peer_host(fd)
        if host is None:
            return
        if self._per_host[host] >= self._per_address:
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                log.warning("refused a connection from %s: it has %d open (limits.CONNECTIONS_PER_ADDRESS); "
                            "%d refused so far", host, self._per_host[host], self.refused)
            _shut_down(fd)
            return
        self._per_host[host] += 1
        self._address_of[(fd, self._generation[fd])] = host


def _peer_host(fd: int) -> str | None:
    try:
        sock = socket_module.socket(fileno=fd)
    except OSError:
        return None
    try:
        peer: Any = sock.getpeername()
        return str(peer[0]) if isinstance(peer, tuple) else None
    except OSError:
        return None
    finally:
        sock.detach()  # (the descriptor is libzmq's: never close it from here)


def _shut_down(fd: int) -> None:
    """End a connection libzmq accepted, without closing its descriptor (libzmq sees the end of
    the stream and closes it itself)."""
    try:
        sock = socket_module.socket(fileno=fd)
    except OSError:
        return
    try:
        sock.shutdown(socket_module.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.detach()
