"""Property-based fuzzing (hypothesis) of the decoder and of a real daemon through a raw socket.

CI-sized: a bounded number of examples. scripts/fuzz_daemon.py is the long-running variant
(millions of messages). The properties: the decoder raises nothing but ProtocolError; the daemon
answers every message it must (or drops the sender's session), never dies, never logs a failure
of its own (a traceback: the catch-all met a bug), and afterwards a real client gets exact results.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libremote_wire import codec, torch_codec

import fuzz_messages
from conftest import Daemon, client_connected_to

CI_SETTINGS = settings(max_examples=300, deadline=None, database=None,
                       suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@CI_SETTINGS
@given(st.one_of(st.binary(max_size=256), fuzz_messages.headers.map(codec.packb)))
def test_the_decoder_raises_nothing_but_protocol_errors(data):
    try:
        torch_codec.unpackb(data)
    except codec.ProtocolError:
        pass


def test_the_daemon_survives_hostile_messages_and_stays_exact():
    server = Daemon("--memory-quota", "64MiB", "--max-handles", "4096")
    client = fuzz_messages.FuzzingClient(server.address)
    try:
        @CI_SETTINGS
        @given(message=fuzz_messages.messages)
        def fuzz(message: tuple[bytes, list[bytes]]) -> None:
            client.send(message)
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
