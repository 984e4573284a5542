"""Property-based fuzzing (hypothesis) of the decoder and of a real daemon through a raw socket.

CI-sized: a bounded number of examples. scripts/fuzz_daemon.py is the long-running variant
(millions of messages). The properties: the decoder raises nothing but ProtocolError; the daemon
answers every message it must (or drops the sender's session), never dies, never logs a failure
of its own (a traceback: the catch-all met a bug), and afterwards a real client gets exact results.
"""

from __future__ import annotations

import itertools

import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from libremote import protocol
from libremote.protocol import Cmd, Msg

import fuzz_messages
from conftest import Daemon, client_connected_to
from raw_client import RawClient

CI_SETTINGS = settings(max_examples=300, deadline=None, database=None,
                       suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@CI_SETTINGS
@given(st.one_of(st.binary(max_size=256), fuzz_messages.headers.map(protocol.packb)))
def test_the_decoder_raises_nothing_but_protocol_errors(data):
    try:
        protocol.unpackb(data)
    except protocol.ProtocolError:
        pass


class FuzzingClient:
    """A raw session that sends hostile messages and, after each, a marker batch it waits for:
    replies come in order, so the marker's reply means the daemon has handled the message."""

    def __init__(self, address: str) -> None:
        self.raw = RawClient(address)
        self.markers = itertools.count(10**12)
        self.start_session()

    def start_session(self) -> None:
        header = self.raw.hello()
        assert header[0] == Msg.WELCOME, header
        for handle in range(1, fuzz_messages.HANDLES + 1):
            self.raw.put(handle, torch.arange(4.0) + handle)

    def send(self, header: bytes, frames: list[bytes]) -> None:
        self.raw.send_raw(header, frames)
        marker = next(self.markers)
        self.raw.send([Msg.BATCH, marker, [[Cmd.SYNC]], True])
        while True:
            reply, _ = self.raw.receive()
            if reply[0] == Msg.REPLY and reply[1] == marker:
                break
        if reply[3] is not None and reply[3][0] == "session":
            self.start_session()  # the message ended the session (BYE, HELLO, a broken bound)


def test_the_daemon_survives_hostile_messages_and_stays_exact():
    server = Daemon("--memory-quota", "64MiB", "--max-handles", "4096")
    client = FuzzingClient(server.address)
    try:
        @CI_SETTINGS
        @given(message=fuzz_messages.messages)
        def fuzz(message: tuple[bytes, list[bytes]]) -> None:
            client.send(*message)
            assert server.process.poll() is None, server.log()[-4000:]

        fuzz()
        assert server.process.poll() is None, server.log()[-4000:]
        assert "Traceback" not in server.log(), server.log()[-6000:]
        with client_connected_to(server.address):
            torch.manual_seed(0)
            a, b = torch.randn(16, 16), torch.randn(16, 16)
            remote = (a.to("cuda") @ b.to("cuda")).relu().sum(0)
            assert torch.equal(remote.cpu(), (a @ b).relu().sum(0))
    finally:
        client.raw.close()
        server.stop()
