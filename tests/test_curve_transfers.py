"""Cross-server copies between daemons that run with --auth-keys (CURVE).

Two CURVE daemons with the same key folder (one tenant, alice; clients name one LIBREMOTE_SERVER_KEY).
The pulling worker connects to the exporting one with the export's one-time key pair, which the
exporting worker made and handed to the client (server/worker/exports.py, SECURITY.md).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import zmq

from libremote_wire import codec, curve_keys
from libremote_wire.messages import Cmd, Msg

from conftest import Daemon
from helpers import last_json, run_python
from raw_client import REPLY_WAIT_S, RawClient

CLIENT_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("keys")
    curve_keys.generate(root / "daemon", "server")
    public, _ = curve_keys.generate(root / "clients", "alice")
    shutil.copy(public, root / "daemon" / public.name)
    return root


@pytest.fixture(scope="module")
def two_curve_daemons(keys: Path) -> Iterator[tuple[Daemon, Daemon]]:
    first, second = Daemon("--auth-keys", str(keys / "daemon")), Daemon("--auth-keys", str(keys / "daemon"))
    yield first, second
    first.stop()
    second.stop()


def alice(keys: Path) -> curve_keys.ClientKeys:
    found = curve_keys.ClientKeys.from_files(str(keys / "clients" / "alice.key_secret"), str(keys / "daemon" / "server.key"))
    assert found is not None
    return found


def test_a_cross_server_copy_between_curve_daemons_is_exact(two_curve_daemons, keys):
    first, second = two_curve_daemons
    result = run_python("copy_to_the_second_daemon_and_back.py", timeout=CLIENT_TIMEOUT_S,
                        LIBREMOTE_SERVER=f"{first.address},{second.address}",
                        LIBREMOTE_CLIENT_KEY=str(keys / "clients" / "alice.key_secret"),
                        LIBREMOTE_SERVER_KEY=str(keys / "daemon" / "server.key"))
    assert result.returncode == 0, result.stderr[-4000:]
    out = last_json(result.stdout)
    assert out["exact"] and out["devices"] == ["cuda:1", "cuda:0"], out


def pull_with(address: str, token: bytes, nbytes: int, *, secret: bytes, public: bytes, server: bytes) -> list | None:
    """One PULL of a whole export from a fresh CURVE socket with the given keys; its answer, or
    None when the worker would not complete the handshake (no answer)."""
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.curve_secretkey, socket.curve_publickey, socket.curve_serverkey = secret, public, server
    socket.connect(address)
    try:
        socket.send(codec.packb([Msg.PULL, token, 0, nbytes]))
        if not socket.poll(3000):
            return None
        frames = socket.recv_multipart()
        return [codec.unpackb(frames[0]), *frames[1:]]
    finally:
        socket.close(0)
        context.term()


def test_an_export_is_pulled_only_with_its_own_key_and_token_once(two_curve_daemons, keys):
    """The tenant's own key may not PULL (it never needs to); the export's key may, once; then the
    key is forgotten; and the export's key can do nothing else (a BATCH is refused)."""
    first, _ = two_curve_daemons
    client_keys = alice(keys)
    with RawClient(first.address, curve=client_keys) as owner:
        assert owner.hello()[0] == Msg.WELCOME
        worker = owner.worker_address()
        owner.put(1, torch.arange(10, dtype=torch.float32))
        results, error, _ = owner.call([[Cmd.EXPORT, 1]])
        assert error is None, error
        token, nbytes, secret, server = results[0]
        public = zmq.curve_public(secret)
        tenant_public = client_keys.public

        by_tenant = pull_with(worker, token, nbytes, secret=client_keys.secret, public=tenant_public, server=server)
        assert by_tenant is not None and by_tenant[0][0] == Msg.PULLED and "no such export" in by_tenant[0][3]

        other_secret = zmq.curve_keypair()[1]
        assert pull_with(worker, token, nbytes, secret=other_secret, public=zmq.curve_public(other_secret),
                         server=server) is None  # an unknown key: no handshake

        pulled = pull_with(worker, token, nbytes, secret=secret, public=public, server=server)
        assert pulled is not None and pulled[0] == [Msg.PULLED, 0, nbytes]
        assert torch.equal(torch.frombuffer(bytearray(pulled[1]), dtype=torch.float32), torch.arange(10.0))
        assert pull_with(worker, token, nbytes, secret=secret, public=public, server=server) is None  # key gone

        results, error, _ = owner.call([[Cmd.EXPORT, 1]])
        token, nbytes, secret, server = results[0]
        context = zmq.Context()
        socket = context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.ROUTING_ID, os.urandom(16))
        socket.curve_secretkey, socket.curve_publickey, socket.curve_serverkey = secret, zmq.curve_public(secret), server
        socket.connect(worker)
        socket.send(codec.packb([Msg.BATCH, 1, [[Cmd.FETCH, 1]], True]))
        assert socket.poll(int(REPLY_WAIT_S * 1000))
        answer = codec.unpackb(socket.recv())
        socket.close(0)
        context.term()
        assert answer[0] == Msg.REPLY and "may only PULL" in answer[3][2], answer
