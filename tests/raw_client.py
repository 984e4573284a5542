"""A bare pyzmq DEALER client that speaks libremote's wire format by hand (no libremote client
code): for tests that send what the real client never would (garbage, forged handles, refused
ops, hostile fields) to a real daemon.

As the real client does, it says HELLO to the daemon's front and, once welcomed, sends everything
else to the session's worker from a second socket with the same routing id and keys."""

from __future__ import annotations

import os
import secrets
from typing import Any

import torch
import zmq

from libremote_wire import codec, messages, torch_codec
from libremote_wire.curve_keys import ClientKeys
from libremote_wire.messages import Cmd, Msg

#: Upper bound for one reply from the daemon on loopback ("it answered", not a speed check).
REPLY_WAIT_S = 20.0


class RawClient:
    """A bare DEALER socket speaking the wire format by hand (no libremote client code)."""

    def __init__(self, address: str, *, curve: ClientKeys | None = None, routing_id: bytes | None = None,
                 options: dict[int, int] | None = None) -> None:
        """``curve``: connect as a CURVE client with these keys (daemons with --auth-keys);
        ``routing_id``: a chosen ZeroMQ routing id instead of a random one (hijack tests);
        ``options``: extra ZeroMQ socket options set before connecting (e.g. a tiny
        ``zmq.RCVHWM`` for a client that does not read its replies)."""
        self.context = zmq.Context()
        self._routing_id = routing_id or secrets.token_bytes(16)
        self._options = options or {}
        self._curve = curve
        self.address = address
        self.front = self.socket = self._dealer(address)
        self.worker: zmq.Socket | None = None
        self.seq = 0
        self.welcome: dict[str, Any] | None = None

    def _dealer(self, address: str) -> zmq.Socket:
        socket = self.context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.ROUTING_ID, self._routing_id)
        for option, value in self._options.items():
            socket.setsockopt(option, value)
        if self._curve is not None:
            self._curve.apply(socket)
        socket.connect(address)
        return socket

    def worker_address(self) -> str:
        assert self.welcome is not None
        if "worker_port" in self.welcome:
            return f"{self.address.rsplit(':', 1)[0]}:{self.welcome['worker_port']}"
        return self.welcome["worker"]

    def close(self, *, goodbye: bool = True) -> None:
        """Close the socket, saying BYE first if a session is open (one left open would count
        against --max-sessions); ``goodbye=False`` drops the connection as a killed client does."""
        linger_ms = 0
        if goodbye and self.welcome is not None:
            try:
                self.socket.send(codec.packb([Msg.BYE]), zmq.NOBLOCK)
                linger_ms = 100
            except zmq.ZMQError:
                pass
        if self.worker is not None:
            self.worker.close(linger_ms)
        self.front.close(linger_ms)
        self.context.term()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- sending ---------------------------------------------------------------------------------
    def send_raw(self, header: bytes, frames: list[bytes] = ()) -> None:
        self.socket.send_multipart([header, *frames])

    def send(self, header: Any, frames: list[bytes] = ()) -> None:
        """Send as a client would: HELLO, STATUS and ADMIN to the front, the rest to the worker
        once welcomed (the receiving socket follows)."""
        if type(header) is list and header and header[0] in (Msg.HELLO, Msg.STATUS, Msg.ADMIN):
            self.socket = self.front
        elif self.worker is not None:
            self.socket = self.worker
        self.send_raw(codec.packb(header), frames)

    def receive(self, timeout_s: float = REPLY_WAIT_S) -> tuple[Any, list[bytes]]:
        if not self.socket.poll(int(timeout_s * 1000), zmq.POLLIN):
            raise AssertionError(f"the daemon sent nothing within {timeout_s} s")
        header, *frames = self.socket.recv_multipart()
        return torch_codec.unpackb(header), frames

    def hello(self, **overrides: Any) -> Any:
        info = {
            "protocol": messages.PROTOCOL_VERSION,
            "libremote": "0.1.0",
            "torch": torch.__version__,
            "python": "3.11.7",
            "pid": os.getpid(),
            "host": "raw-test-client",
            "argv": "test_faults",
        }
        info.update(overrides)
        self.front.send(codec.packb([Msg.HELLO, info]))
        self.socket = self.front
        header, _ = self.receive()
        if header[0] == Msg.WELCOME:
            self.welcome = header[1]
            if self.worker is not None:
                self.worker.close(0)
            self.worker = self.socket = self._dealer(self.worker_address())
        return header

    def batch(self, commands: list[Any], frames: list[bytes] = (), *, want_reply: bool = True) -> int:
        self.seq += 1
        self.send([Msg.BATCH, self.seq, commands, want_reply], frames)
        return self.seq

    def call(self, commands: list[Any], frames: list[bytes] = ()) -> tuple[list[Any], Any, list[bytes]]:
        """Send a batch that wants a reply; return (results, error, frames) of that reply."""
        seq = self.batch(commands, frames)
        header, out = self.receive()
        assert header[0] == Msg.REPLY, header
        assert header[1] == seq, f"reply to seq {header[1]!r}, expected {seq}: {header}"
        return header[2], header[3], out

    # -- conveniences ----------------------------------------------------------------------------
    def put(self, handle: int, tensor: torch.Tensor) -> Any:
        tensor = tensor.contiguous()
        results, error, _ = self.call(
            [[Cmd.PUT, handle, torch_codec.dtype_ext(tensor.dtype), list(tensor.shape), list(tensor.stride()), 0, 1]],
            [bytes(torch_codec.tensor_bytes(tensor))],
        )
        assert error is None, error
        return results

    def fetch(self, handle: int) -> torch.Tensor:
        results, error, frames = self.call([[Cmd.FETCH, handle]])
        assert error is None, error
        dtype, shape, stride, index = results[0]
        return torch_codec.tensor_from_bytes(bytearray(frames[index - 1]), dtype, shape).clone()

    def memory(self) -> dict[str, int]:
        results, error, _ = self.call([[Cmd.QUERY, "memory"]])
        assert error is None, error
        return results[0]
