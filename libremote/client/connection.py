"""The client's end of the wire: a ZeroMQ DEALER to the daemon's front, then one to its worker.

Layer 1, the session: the lowest layer of the client, which imports nothing else of it.

The client says HELLO to the daemon's front (the address the user gave); the front admits it
(WELCOME, after waiting in line if the pool is full) and names the worker process that runs the
session, one per tenant. From then on every BATCH, PING and BYE goes straight to that worker, from
a second socket with the same routing id and keys (the worker knows the client by them), and the
replies come from there. Under CURVE, large frames go over extra connections to the worker, the
session's stripes (``stripes.py``): one connection is encrypted at one core's speed. The front's
socket stays open: should the worker die (a crash, the op time limit), the front says why there,
and the client raises that.

Not thread-safe on its own: :class:`~libremote.client.session.ClientSession` serialises access.
A connection that lost its daemon stays broken: messages in flight may have been dropped, so
continuing would silently compute on missing state. The user reconnects explicitly.
"""

from __future__ import annotations

import os
import platform
import secrets
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from libremote_wire import codec, curve_keys, messages, torch_codec
from libremote_wire import stripes as wire_stripes
from libremote_wire.messages import ErrorKind, Msg
from libremote_wire.zmq_events import readable, send_parts

from ..errors import ConnectionFailed, Refused
from .stripes import Stripes, stripe_count

_POLL_SLICE_MS = 100
_NOBLOCK = int(zmq.NOBLOCK)
#: How long a closing connection may take to send what is queued (its BYE) before it goes.
_CLOSE_LINGER_MS = 500
#: When the worker's connection drops, how long to wait for the front to say why.
_WHY_WAIT_S = 1.0


class Connection:
    def __init__(self, address: str, *, timeout_s: float, heartbeat_s: float, spin_s: float = 0.0,
                 curve: curve_keys.ClientKeys | None = None, stripes: int = 0) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.spin_s = spin_s
        self._last_wait_s = 0.0  # how long the last answer took (receive spins only after short ones)
        self.pid = os.getpid()
        self.broken: str | None = None
        #: Why the daemon would not complete the ZMTP handshake (a CURVE key it does not know,
        #: CURVE on one side only): seen on the monitor, raised instead of "no daemon answered".
        self.handshake_failure: str | None = None
        self._using_curve = curve is not None
        self._curve = curve
        self._heartbeat_s = heartbeat_s
        self._routing_id = secrets.token_bytes(16)
        #: Stripes asked for (LIBREMOTE_STRIPES; CURVE only), and once the worker is known, open.
        self._stripes_wanted = stripes if curve is not None else 0
        self._stripes: Stripes | None = None
        # One I/O thread per connection that carries bulk data: each encrypts its own.
        self._context = zmq.Context(io_threads=1 + self._stripes_wanted)
        self._front = self._socket = self._dealer()
        self._worker: zmq.Socket | None = None
        self._monitor = self._watch(self._front)
        self._connected_once = False
        self.last_send = time.monotonic()
        #: Bytes of every message received / sent (headers and frames): a cross-server copy is
        #: shown not to pass through the client by these (tests/test_aggregation.py).
        self.bytes_received = 0
        self.bytes_sent = 0
        try:
            self._front.connect(address)
        except zmq.ZMQError as exc:
            self._close_sockets()
            raise ConnectionFailed(
                f"libremote: {address!r} is not a ZeroMQ address ({exc}); expected tcp://host:port"
            ) from None
        self.welcome: dict[str, Any] = {}

    def _dealer(self, *, immediate: bool = True) -> zmq.Socket:
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.ROUTING_ID, self._routing_id)
        if immediate:
            # Queue nothing for a peer that is not connected: the handshake then fails fast. (Not
            # for the worker: its connection is made while WELCOME is read, and what a worker
            # said just before it went, "session closed: idle", must stay readable after; with
            # IMMEDIATE, libzmq drops a closed connection's unread messages.)
            socket.setsockopt(zmq.IMMEDIATE, 1)
        socket.setsockopt(zmq.HEARTBEAT_IVL, int(self._heartbeat_s * 1000))
        socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(self._heartbeat_s * 3000))
        socket.setsockopt(zmq.SNDHWM, 0)
        socket.setsockopt(zmq.RCVHWM, 0)
        if self._curve is not None:
            self._curve.apply(socket)
        return socket

    @staticmethod
    def _watch(socket: zmq.Socket) -> zmq.Socket:
        return socket.get_monitor_socket(
            zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | curve_keys.HANDSHAKE_FAILED_EVENTS)

    # ------------------------------------------------------------------------------------------
    def handshake(self, libremote_version: str, *, tenant: str | None = None, token: str | None = None,
                  priority: str | None = None, queue_timeout_s: float = 300.0, devices: int = 1,
                  device_indices: list[int] | None = None, reservation: str | None = None) -> dict[str, Any]:
        """Say HELLO and wait for WELCOME; while queued (QUEUED), wait up to ``queue_timeout_s``."""
        hello = {
            "protocol": messages.PROTOCOL_VERSION,
            "libremote": libremote_version,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "argv": " ".join(sys.argv)[:200],
            "tenant": tenant,
            "token": token,
            "priority": priority,
            "devices": devices,
        }
        if device_indices is not None:
            hello["device_indices"] = device_indices
        if reservation is not None:  # (placed through a pool: the daemon checks it in etcd)
            hello["reservation"] = reservation
        deadline = time.monotonic() + self.timeout_s
        try:
            self.send([Msg.HELLO, hello], timeout_s=self.timeout_s)
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not self._socket.poll(remaining_ms, zmq.POLLIN):
                raise TimeoutError
        except (TimeoutError, ConnectionFailed):
            self._drain_monitor()
            self.close()
            raise ConnectionFailed(self.handshake_failure) if self.handshake_failure else self._unreachable() from None
        header = torch_codec.unpackb(self._socket.recv())
        self._drain_monitor()
        if header[0] == Msg.QUEUED:
            header = self._wait_in_queue(header[1], queue_timeout_s)
        if header[0] == Msg.REFUSED:
            self.close()
            raise Refused(f"libremote: the daemon at {self.address} refused this client: {header[1]}",
                          address=self.address, kind=str(header[2]) if len(header) > 2 and header[2] else "")
        if header[0] != Msg.WELCOME:
            self.close()
            raise ConnectionFailed(f"libremote: {self.address} answered the handshake with message kind {header[0]}")
        self.welcome = header[1]
        self._connect_worker(self.welcome)
        return self.welcome

    def _connect_worker(self, welcome: dict[str, Any]) -> None:
        """Open the session's own connection, to the worker WELCOME names (on the host the
        client reached the front at, when it is a TCP port)."""
        address = welcome["worker"]
        if address.startswith("tcp://") and "worker_port" in welcome:
            address = f"{self.address.rsplit(':', 1)[0]}:{welcome['worker_port']}"
        self._worker = self._socket = self._dealer(immediate=False)
        self._drain_monitor()
        self._front.disable_monitor()
        self._monitor.close(0)
        self._monitor = self._watch(self._worker)
        self._connected_once = False
        self.worker_address = address
        try:
            self._worker.connect(address)
        except zmq.ZMQError as exc:
            self.close()
            raise ConnectionFailed(f"libremote: the daemon named a worker at {address!r} that this client cannot "
                                   f"connect to ({exc})") from None
        count = stripe_count(self._stripes_wanted, welcome)
        if count and self._curve is not None:
            self._stripes = Stripes(self._context, address, self._routing_id, count, curve=self._curve,
                                    heartbeat_s=self._heartbeat_s)

    def _wait_in_queue(self, info: dict[str, Any], queue_timeout_s: float) -> list[Any]:
        """The daemon's sessions are all taken: wait for WELCOME (or REFUSED), PINGing."""
        interval = float(info.get("heartbeat_s", 2.0))
        deadline = time.monotonic() + queue_timeout_s
        position = info.get("position")
        while time.monotonic() < deadline:
            wait_ms = int(min(interval, max(0.0, deadline - time.monotonic())) * 1000)
            if self._socket.poll(max(1, wait_ms), zmq.POLLIN):
                header = torch_codec.unpackb(self._socket.recv())
                if header[0] == Msg.QUEUED:
                    position = header[1].get("position", position)
                    continue
                return header
            self._drain_monitor()
            if self.broken:
                raise ConnectionFailed(self.broken)
            self.send([Msg.PING], timeout_s=1.0)
        try:
            self.send([Msg.BYE], timeout_s=1.0)
        finally:
            self.close()
        raise ConnectionFailed(
            f"libremote: waited {queue_timeout_s:g} s in the admission queue of the daemon at {self.address} "
            f"(position {position}): {info.get('reason', 'its sessions are all taken')}. "
            "LIBREMOTE_QUEUE_TIMEOUT sets how long to wait; the operator can raise --max-sessions."
        )

    def _unreachable(self) -> ConnectionFailed:
        return ConnectionFailed(
            f"libremote: no daemon answered at {self.address} within {self.timeout_s:g} s. "
            f"Check that libremote-server is running there (libremote-server --listen {self.address}), "
            "that host and port are right and reachable from this machine (firewall), and that the "
            "variable LIBREMOTE_SERVER or libremote.connect() names it. LIBREMOTE_TIMEOUT sets this wait."
        )

    # ------------------------------------------------------------------------------------------
    def send(self, header: list[Any], frames: list[Any] = (), *, track: bool = False,
             timeout_s: float | None = None) -> zmq.MessageTracker | None:
        """Send one message. While no daemon is connected (``IMMEDIATE``: nothing is queued for
        a missing peer) wait, until the connection is reported lost or ``timeout_s`` passes
        (then :class:`TimeoutError`)."""
        self._check_usable()
        trackers: list[Any] = []
        if self._stripes is not None and header[0] == Msg.BATCH and any(wire_stripes.striped(f) for f in frames) \
                and self._stripes.usable():
            header, frames, trackers = self._stripes.send(header, list(frames), track=track)
        data = [codec.packb(header), *frames]
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        # Zero-copy only pays for big frames; a header alone goes faster copied.
        zero_copy = bool(frames)
        while True:
            try:
                tracker = send_parts(self._socket, data, _NOBLOCK, copy=not zero_copy, track=track and zero_copy)
                if trackers:
                    tracker = zmq.MessageTracker(*trackers, *([tracker] if tracker is not None else []))
                self.last_send = time.monotonic()
                self.bytes_sent += len(data[0]) + (sum(memoryview(frame).nbytes for frame in frames) if frames else 0)
                return tracker
            except zmq.Again:
                pass
            self._socket.poll(_POLL_SLICE_MS, zmq.POLLOUT)
            self._drain_monitor()
            if self.broken:
                raise ConnectionFailed(self.broken)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"could not send to {self.address} within {timeout_s:g} s")

    def receive(self, while_waiting: Callable[[], None] | None = None) -> tuple[list[Any], list[zmq.Frame]]:
        """Wait for the next message; raise :class:`ConnectionFailed` if the daemon goes away.
        ``while_waiting`` runs between poll slices (heartbeats during long waits).

        When the last answer came within ``spin_s``, the wait first polls without sleeping for
        up to ``spin_s``: a thread that blocks at once pays the operating system's wake-up on
        the reply, which on a small VM is a large part of a short round trip (see the round-trip
        notes in benchmarks/README.md). When the last answer took longer (a training step's
        sync), the wait blocks at once, so a client sharing cores with its daemon does not take
        CPU time from the work it waits for."""
        self._check_usable()
        started = time.perf_counter()
        if self.spin_s and self._last_wait_s < self.spin_s:
            # ZMQ_EVENTS is one C call; Socket.poll builds a Poller each time (~5 us here).
            socket, give_up = self._socket, started + self.spin_s
            while not readable(socket) and time.perf_counter() < give_up:
                os.sched_yield()  # a thread of the daemon (or of ZeroMQ) on this core goes first
        while True:
            # (Asked directly first: after a spin the reply is usually there, and Socket.poll
            # builds a Poller for every call.)
            if readable(self._socket) or self._socket.poll(_POLL_SLICE_MS, zmq.POLLIN):
                frames = self._socket.recv_multipart(copy=False)
                self._last_wait_s = time.perf_counter() - started
                self.bytes_received += sum(len(frame) for frame in frames)
                header = torch_codec.unpackb(frames[0].buffer)
                if self._stripes is not None and type(header) is list and len(header) == 5 and header[0] == Msg.REPLY:
                    parts = self._stripes.receive(header[4], frames[1:], self._lost)
                    self.bytes_received += sum(len(part) for part in parts)
                    return header[:4], parts
                return header, frames[1:]
            if self._worker is not None and readable(self._front):
                # The front says the session ended (its worker died, the op time limit): a REPLY
                # without seq, which the session raises like any other session error.
                return codec.unpackb(self._front.recv()), []
            self._drain_monitor()
            if self.broken:
                raise ConnectionFailed(self.broken)
            if while_waiting is not None:
                while_waiting()

    def striped_bytes(self) -> tuple[int, int, int]:
        """(stripes open, frame bytes sent over them, received over them)."""
        if self._stripes is None:
            return 0, 0, 0
        return self._stripes.count, self._stripes.bytes_sent, self._stripes.bytes_received

    def _lost(self) -> str | None:
        """Why the session's connection is gone, or None (asked while a reply's chunks come in)."""
        self._drain_monitor()
        return self.broken

    def _drain_monitor(self) -> None:
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._connected_once = True
            elif event & curve_keys.HANDSHAKE_FAILED_EVENTS and not self._connected_once:
                # (ZeroMQ would retry for ever: waiting out the timeout tells the user nothing.)
                self.handshake_failure = curve_keys.handshake_failure(event, self.address, self._using_curve)
                self.broken = self.broken or self.handshake_failure
            elif event == zmq.EVENT_DISCONNECTED and self._connected_once and not self.broken:
                self.broken = self._why_lost() or (
                    f"libremote: lost the connection to the daemon at {self.address} (it stopped, "
                    "crashed or became unreachable). Tensors on it are gone; call "
                    "libremote.connect() to start a new session."
                )

    def _why_lost(self) -> str | None:
        """When the worker's connection dropped: why the session ended, if the worker said so
        before it went (an idle timeout) or the front says so now (the worker died)."""
        if self._worker is None:
            return None
        if readable(self._worker):
            source = self._worker
        elif self._front.poll(int(_WHY_WAIT_S * 1000), zmq.POLLIN):
            source = self._front
        else:
            return None
        try:
            header = codec.unpackb(source.recv(zmq.NOBLOCK))
        except (zmq.ZMQError, codec.ProtocolError):
            return None
        if type(header) is list and len(header) == 4 and header[0] == Msg.REPLY and isinstance(header[3], list) \
                and len(header[3]) == 3 and header[3][0] == ErrorKind.SESSION.value:
            return f"libremote: the daemon at {self.address} ended this session: {header[3][2]}"
        return None

    def _check_usable(self) -> None:
        # (Loss of the daemon is noticed where waiting starts: a send that cannot go out, or a
        # reply that does not come; both drain the monitor.)
        if os.getpid() != self.pid:
            raise ConnectionFailed(
                "libremote: this process was forked from the one that opened the connection; a "
                "child cannot use its parent's remote tensors. Call libremote.connect() in the child."
            )
        if self.broken:
            raise ConnectionFailed(self.broken)

    def close(self) -> None:
        if os.getpid() != self.pid:
            return  # never touch ZeroMQ state inherited through fork
        # A connection still up may have a last message queued (BYE): let it go out, briefly.
        linger_ms = 0 if self.broken else _CLOSE_LINGER_MS
        if not self.broken:
            self.broken = "libremote: the connection was closed; call libremote.connect() to open another"
        self._close_sockets(linger_ms)

    def _close_sockets(self, linger_ms: int = 0) -> None:
        try:
            self._socket.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close(0)
        self._front.close(0)
        if self._stripes is not None:
            self._stripes.close()
        if self._worker is not None:
            self._worker.close(linger_ms)
        self._context.term()
