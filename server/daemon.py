"""The daemon's message loop: a ZeroMQ ROUTER that turns messages into session work.

One thread owns the socket and every session. Ops are launched on the device asynchronously
(a GPU works through them while this loop receives the next batch); the loop waits on the device
only where a client asked for data back. Whatever a client sends, the loop answers it or drops
it and keeps serving everyone else.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

import torch
import zmq

import libremote
from libremote import protocol
from libremote.protocol import ErrorKind, Msg, ProtocolError

from . import devices
from .session import Session

log = logging.getLogger("libremote.server")


class Daemon:
    """Serve clients on ``address`` with ops executed on ``device``."""

    def __init__(
        self,
        address: str,
        device: torch.device,
        *,
        max_message_bytes: int = 16 << 30,
        heartbeat_s: float = 2.0,
        heartbeat_timeout_s: float = 10.0,
    ) -> None:
        self.device = device
        self.heartbeat_s = heartbeat_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._next_reclaim_check = 0.0
        self.facts = devices.describe(device)
        self.sessions: dict[bytes, Session] = {}
        self._stop = threading.Event()
        self._context = zmq.Context.instance()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self._socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # ZMTP heartbeats: a peer whose host vanished is disconnected instead of lingering.
        self._socket.setsockopt(zmq.HEARTBEAT_IVL, int(heartbeat_s * 1000))
        self._socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(heartbeat_s * 3000))
        if address.endswith(":0"):
            port = self._socket.bind_to_random_port(address.rsplit(":", 1)[0])
            address = f"{address.rsplit(':', 1)[0]}:{port}"
        else:
            self._socket.bind(address)
        self.address = self._socket.getsockopt_string(zmq.LAST_ENDPOINT) or address
        torch.set_grad_enabled(False)

    # ------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to finish (safe from a signal handler or another thread)."""
        self._stop.set()

    def serve_forever(self) -> None:
        log.info(
            "libremote-server %s listening on %s, executing on %s (%s), torch %s, protocol %d",
            libremote.__version__, self.address, self.device, self.facts.name, torch.__version__,
            protocol.PROTOCOL_VERSION,
        )
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                ready = poller.poll(200)
                self._reclaim_silent_sessions()
                if not ready:
                    continue
                while True:
                    try:
                        frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._on_message(frames)
        finally:
            for identity in list(self.sessions):
                self._end_session(identity, "daemon stopping")
            self._socket.close(0)
            log.info("libremote-server stopped")

    # ------------------------------------------------------------------------------------------
    def _on_message(self, frames: list[zmq.Frame]) -> None:
        identity = frames[0].bytes
        seq: Any = None
        try:
            if len(frames) < 2:
                raise ProtocolError("message has no header frame")
            header = protocol.unpackb(frames[1].buffer)
            if not isinstance(header, list) or not header or not isinstance(header[0], int):
                raise ProtocolError("header must be an array starting with a message kind")
            kind = header[0]
            if kind == Msg.BATCH:
                protocol.check(len(header) == 4, "BATCH is [BATCH, seq, commands, want_reply]")
                seq = header[1]
                self._on_batch(identity, seq, header[2], bool(header[3]), [f.buffer for f in frames[2:]])
            elif kind == Msg.HELLO:
                protocol.check(len(header) == 2 and isinstance(header[1], dict), "HELLO is [HELLO, info]")
                self._on_hello(identity, header[1])
            elif kind == Msg.BYE:
                self._end_session(identity, "client said goodbye")
            elif kind == Msg.PING:
                session = self.sessions.get(identity)
                if session is not None:
                    session.last_seen = time.monotonic()
            else:
                raise ProtocolError(f"unknown message kind {kind}")
        except ProtocolError as exc:
            log.warning("malformed message from %s: %s", identity.hex()[:12], exc)
            self._send(identity, [Msg.REPLY, seq, [], [ErrorKind.PROTOCOL.value, "", str(exc)]])

    def _on_hello(self, identity: bytes, info: dict[str, Any]) -> None:
        client_protocol = info.get("protocol")
        if client_protocol != protocol.PROTOCOL_VERSION:
            reason = (
                f"protocol mismatch: the client speaks libremote protocol {client_protocol} "
                f"(libremote {info.get('libremote')}), this daemon speaks {protocol.PROTOCOL_VERSION} "
                f"(libremote {libremote.__version__}); install the same libremote release on both sides"
            )
            log.warning("refused %s: %s", identity.hex()[:12], reason)
            self._send(identity, [Msg.REFUSED, reason])
            return
        if identity in self.sessions:
            self._end_session(identity, "client said hello again")
        session = Session(uuid.uuid4().hex[:12], self.device, info)
        self.sessions[identity] = session
        log.info(
            "session %s opened: pid %s on %s, torch %s",
            session.id, info.get("pid"), info.get("host"), info.get("torch"),
        )
        self._send(
            identity,
            [
                Msg.WELCOME,
                {
                    "session": session.id,
                    "protocol": protocol.PROTOCOL_VERSION,
                    "libremote": libremote.__version__,
                    "torch": torch.__version__,
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "devices": [self.facts.to_wire()],
                    "heartbeat_s": self.heartbeat_s,
                },
            ],
        )

    def _on_batch(self, identity: bytes, seq: Any, commands: Any, want_reply: bool, frames: list[Any]) -> None:
        session = self.sessions.get(identity)
        if session is None:
            if want_reply:
                error = [ErrorKind.SESSION.value, "", "this daemon has no session for the client "
                         "(it restarted or reclaimed the session); reconnect"]
                self._send(identity, [Msg.REPLY, seq, [], error])
            return
        session.last_seen = time.monotonic()
        try:
            results, out_frames = session.execute(commands, frames)
        except ProtocolError as exc:
            log.warning("session %s sent a malformed batch: %s", session.id, exc)
            self._send(identity, [Msg.REPLY, seq, [], [ErrorKind.PROTOCOL.value, "", str(exc)]])
            return
        if want_reply:
            self._send(identity, [Msg.REPLY, seq, results, session.take_error()], out_frames)

    def _reclaim_silent_sessions(self) -> None:
        """Free the sessions of clients that stopped sending anything, PINGs included."""
        now = time.monotonic()
        if now < self._next_reclaim_check:
            return
        self._next_reclaim_check = now + 0.5
        for identity, session in list(self.sessions.items()):
            silent = now - session.last_seen
            if silent > self.heartbeat_timeout_s:
                self._end_session(identity, f"client silent for {silent:.0f} s: killed, hung or unreachable")

    def _end_session(self, identity: bytes, why: str) -> None:
        session = self.sessions.pop(identity, None)
        if session is not None:
            released = session.close()
            log.info("session %s closed (%s), released %d bytes", session.id, why, released)

    def _send(self, identity: bytes, header: list[Any], frames: list[Any] = ()) -> None:
        try:
            self._socket.send_multipart([identity, protocol.packb(header), *frames], copy=not frames)
        except zmq.ZMQError as exc:  # the peer is gone (ROUTER_MANDATORY): nothing to deliver
            log.debug("could not reply to %s: %s", identity.hex()[:12], exc)
