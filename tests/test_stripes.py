"""Striped bulk transfer under CURVE: large frames over several connections of one key.

A CURVE daemon (``--auth-keys``) with tenant alice's two keys (``alice.key`` and
``alice.laptop.key``: one tenant, two keys). Real clients in subprocesses and raw pyzmq sockets.
See server/worker/stripes.py and libremote/client/stripes.py for what these tests hold.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import zmq

from libremote_wire import codec, curve_keys, messages
from libremote_wire.messages import Msg

from helpers import CLIENT_TIMEOUT_S, last_json, run_python, wait_for_log
from ops_support import MetricsDaemon, value
from raw_client import REPLY_WAIT_S, RawClient


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    """The key folder: DIR/daemon (the daemon's --auth-keys) and DIR/clients (the clients' pairs)."""
    root = tmp_path_factory.mktemp("keys")
    curve_keys.generate(root / "daemon", "server")
    for name in ("alice", "alice.laptop"):
        public, _ = curve_keys.generate(root / "clients", name)
        shutil.copy(public, root / "daemon" / public.name)
    return root


@pytest.fixture(scope="module")
def daemon(keys: Path) -> Iterator[MetricsDaemon]:
    server = MetricsDaemon("--auth-keys", str(keys / "daemon"))
    yield server
    server.stop()


def client_keys(keys: Path, name: str) -> curve_keys.ClientKeys:
    found = curve_keys.ClientKeys.from_files(str(keys / "clients" / f"{name}.key_secret"), str(keys / "daemon" / "server.key"))
    assert found is not None
    return found


def env(keys: Path, name: str, **more: str) -> dict[str, str]:
    return {"LIBREMOTE_CLIENT_KEY": str(keys / "clients" / f"{name}.key_secret"),
            "LIBREMOTE_SERVER_KEY": str(keys / "daemon" / "server.key"), **more}


@pytest.mark.parametrize("stripes", ["2", "0"])
def test_uploads_and_fetches_through_stripes_are_bit_exact(daemon, keys, stripes):
    """Tensors below, at and far above the stripe threshold, odd sizes, uploads cut in pieces:
    what comes back (and what an op made of it) equals local torch bit for bit, with the large
    frames carried by the stripes (LIBREMOTE_STRIPES=2) or by the session's connection (0)."""
    result = run_python("striped_transfers.py", timeout=CLIENT_TIMEOUT_S, LIBREMOTE_SERVER=daemon.address,
                        **env(keys, "alice", LIBREMOTE_STRIPES=stripes))
    assert result.returncode == 0, result.stderr[-3000:]
    report = last_json(result.stdout)
    assert report["exact"] == report["all"]
    assert report["stripes"] == int(stripes)
    if stripes == "0":
        assert report["striped_sent"] == report["striped_received"] == 0
    else:
        # Every frame of at least STRIPE_MIN_BYTES went striped: ~27 MiB up, twice that down.
        assert report["striped_sent"] > 24 << 20 and report["striped_received"] > 48 << 20
    assert "without stripes" not in result.stderr


def stripe_request(address: str, keys: curve_keys.ClientKeys, session_routing_id: bytes) -> list:
    """Ask the worker at ``address`` to take a new connection as a stripe of that session."""
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    keys.apply(socket)
    socket.connect(address)
    try:
        socket.send(codec.packb([Msg.STRIPE, session_routing_id]))
        assert socket.poll(int(REPLY_WAIT_S * 1000)), "the worker did not answer STRIPE"
        return codec.unpackb(socket.recv())
    finally:
        socket.close(0)
        context.term()


def test_a_stripe_from_another_key_is_refused_and_counted(daemon, keys):
    """A session's stripes must come from the key that opened it: another key of the same tenant
    (which the worker lets in: it is the tenant's) is refused, logged and counted, and so is a
    routing id no session has; the session's own key is taken."""
    routing_id = os.urandom(16)
    with RawClient(daemon.address, curve=client_keys(keys, "alice"), routing_id=routing_id) as owner:
        assert owner.hello()[0] == Msg.WELCOME
        assert "stripes" in owner.welcome["features"]
        worker = owner.worker_address()
        owner.put(1, torch.arange(8.0))  # (the session is live at its worker)

        refused = stripe_request(worker, client_keys(keys, "alice.laptop"), routing_id)
        assert refused[0] == Msg.REFUSED and "no session of this key" in refused[1]
        assert stripe_request(worker, client_keys(keys, "alice"), os.urandom(16))[0] == Msg.REFUSED
        assert stripe_request(worker, client_keys(keys, "alice"), routing_id) == [Msg.STRIPE, routing_id]

        wait_for_log(daemon, "refused a stripe from")
        daemon.wait_metric(lambda s: value(s, "libremote_rejected_messages_total", where="worker", reason="stripe") == 2,
                           "two refused stripes")
        assert torch.equal(owner.fetch(1), torch.arange(8.0))  # the session went on untouched


def test_the_wire_declares_stripes():
    assert messages.MESSAGES[Msg.STRIPE].fields[0].name == "session_routing_id"
    assert messages.STRIPE_MIN_BYTES >= messages.STRIPE_CHUNK_BYTES


def test_a_striped_frame_is_put_back_whatever_the_order_and_a_peer_is_bounded():
    """Chunks may come before the message that names their transfer (stripes are separate
    connections), in any order; a peer cannot make this end hold more than its bound, nor write
    outside a frame."""
    from libremote_wire.codec import ProtocolError
    from libremote_wire.stripes import Assembly, pieces

    data = bytes(range(256)) * 9000 + b"xyz"  # 2.2 MB: five chunks, the last one short
    parts = list(pieces(data, 2))
    assert len(parts) == 5 and b"".join(bytes(piece) for _, piece in parts) == data
    assembly = Assembly(max_bytes=4 << 20)
    for offset, piece in parts[3:]:  # early, before the announcement
        assembly.add(9, offset, len(data), piece)
    assembly.expect(9, len(data))
    for offset, piece in reversed(parts[:3]):
        assert not assembly.complete(9)
        assembly.add(9, offset, len(data), piece)
    assert assembly.complete(9) and assembly.take(9).buffer == data and assembly.held == 0

    with pytest.raises(ProtocolError, match="over the bound"):
        for transfer in range(10):  # chunks whose message never comes
            assembly.add(100 + transfer, 0, 1 << 20, bytes(1 << 20))
    fresh = Assembly(max_bytes=4 << 20)
    fresh.expect(1, 100)
    with pytest.raises(ProtocolError, match="does not fit"):
        fresh.add(1, 90, 100, bytes(20))
    with pytest.raises(ProtocolError, match="over the bound"):
        fresh.expect(2, 8 << 20)
