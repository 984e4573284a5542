"""The daemon as a trust boundary: CURVE keys, encrypted traffic, sessions bound to identities.

A CURVE daemon (``--auth-keys``) with two tenant keys (alice, bob) and an admin key (boss); a
fourth key (mallory) it has never seen. Real clients in subprocesses (``LIBREMOTE_CLIENT_KEY``,
``LIBREMOTE_SERVER_KEY``) and raw pyzmq sockets with those keys (:class:`RawClient`). See
server/auth.py for the model these tests hold the daemon to.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from libremote_wire import curve_keys, messages
from libremote_wire.messages import Cmd, Msg

from conftest import REPO, Daemon, free_port, subprocess_env
from helpers import (
    CLIENT_TIMEOUT_S,
    cli,
    last_json,
    pool_daemon,
    run_python,
    wait_for_log,
)
from raw_client import REPLY_WAIT_S, RawClient

TENANTS = ("alice", "bob")


@dataclass
class Keys:
    """Key files of one test module: the daemon's --auth-keys folder and every client's pair."""

    daemon_dir: Path
    clients_dir: Path

    def client(self, name: str) -> curve_keys.ClientKeys:
        keys = curve_keys.ClientKeys.from_files(str(self.secret(name)), str(self.daemon_dir / "server.key"))
        assert keys is not None
        return keys

    def secret(self, name: str) -> Path:
        return self.clients_dir / f"{name}.key_secret"

    def env(self, name: str) -> dict[str, str]:
        return {"LIBREMOTE_CLIENT_KEY": str(self.secret(name)),
                "LIBREMOTE_SERVER_KEY": str(self.daemon_dir / "server.key")}


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Keys:
    root = tmp_path_factory.mktemp("keys")
    found = Keys(root / "daemon", root / "clients")
    curve_keys.generate(found.daemon_dir, "server")
    (found.daemon_dir / "admin").mkdir()
    for name in (*TENANTS, "boss", "mallory"):
        public, _ = curve_keys.generate(found.clients_dir, name)
        if name in TENANTS:
            shutil.copy(public, found.daemon_dir / public.name)
        elif name == "boss":
            shutil.copy(public, found.daemon_dir / "admin" / public.name)
    return found


@pytest.fixture(scope="module")
def curve_daemon(keys: Keys) -> Iterator[Daemon]:
    server = Daemon("--auth-keys", str(keys.daemon_dir))
    yield server
    server.stop()


def ask(address: str, message: list, keys: curve_keys.ClientKeys | None = None) -> list:
    """One request from a fresh raw socket; its answer."""
    with RawClient(address, curve=keys) as raw:
        raw.send(message)
        header, _ = raw.receive()
        return header


# ------------------------------------------------------------------------------------------------
# Keys
# ------------------------------------------------------------------------------------------------
def test_keygen_writes_a_key_pair_whose_secret_only_its_owner_can_read(tmp_path):
    made = cli("keygen", "client", "research", "--dir", str(tmp_path))
    assert made.returncode == 0, made.stdout + made.stderr
    assert stat.S_IMODE(os.stat(tmp_path / "research.key_secret").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "research.key").st_mode) == 0o644
    assert "LIBREMOTE_CLIENT_KEY" in made.stdout and "LIBREMOTE_SERVER_KEY" in made.stdout, made.stdout
    public, secret = curve_keys.load_secret(tmp_path / "research.key_secret")
    assert curve_keys.load_public(tmp_path / "research.key") == public and len(secret) == 40

    again = cli("keygen", "client", "research", "--dir", str(tmp_path))
    assert again.returncode != 0 and "exists already" in again.stderr, again.stderr
    assert curve_keys.load_public(tmp_path / "research.key") == public  # not overwritten

    daemon = cli("keygen", "daemon", "--dir", str(tmp_path / "daemon"))
    assert daemon.returncode == 0, daemon.stdout + daemon.stderr
    assert "--auth-keys" in daemon.stdout and (tmp_path / "daemon" / "server.key_secret").exists()

    os.chmod(tmp_path / "research.key_secret", 0o644)  # as a careless copy would leave it
    with pytest.raises(curve_keys.KeyFileError, match="chmod 600"):
        curve_keys.load_secret(tmp_path / "research.key_secret")


# ------------------------------------------------------------------------------------------------
# Clients with and without the right keys
# ------------------------------------------------------------------------------------------------
def test_a_client_with_its_tenant_key_computes_like_local_torch(curve_daemon, keys):
    # The tenant name in HELLO (LIBREMOTE_TENANT) is the client's word; the key is the proof.
    result = run_python("compute_with_a_key.py", timeout=CLIENT_TIMEOUT_S, LIBREMOTE_SERVER=curve_daemon.address,
                        LIBREMOTE_TENANT="bob", **keys.env("alice"))
    assert result.returncode == 0, result.stderr
    report = last_json(result.stdout)
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(16, 32, generator=g), torch.randn(32, 8, generator=g)
    assert torch.equal(torch.tensor(report["out"]), torch.relu(a @ b).sum(dim=0))
    assert report["tenant"] == "alice"


def test_unknown_or_missing_keys_get_a_clear_error_not_a_wait(curve_daemon, keys):
    # LIBREMOTE_TIMEOUT is long: a client that did not notice the refusal would wait it out and
    # then say only that no daemon answered, which is not what is asserted.
    cases = {"unknown key": keys.env("mallory"), "no key": {},
             "wrong daemon key": {**keys.env("alice"), "LIBREMOTE_SERVER_KEY": str(keys.clients_dir / "bob.key")}}
    result = run_python("connect_with_each_key_setting.py", timeout=CLIENT_TIMEOUT_S, ADDRESS=curve_daemon.address,
                        CASES=json.dumps(cases), LIBREMOTE_TIMEOUT="100")
    assert result.returncode == 0, result.stderr
    messages = last_json(result.stdout)
    assert "does not accept this client's key" in messages["unknown key"], messages
    assert "--auth-keys" in messages["unknown key"], messages
    assert "LIBREMOTE_CLIENT_KEY" in messages["no key"] and "CURVE" in messages["no key"], messages
    assert "LIBREMOTE_SERVER_KEY" in messages["wrong daemon key"], messages
    assert "refused a connection with an unknown CURVE key" in curve_daemon.log()


def test_the_status_command_with_an_unknown_key_says_so(curve_daemon, keys):
    result = cli("status", "--server", curve_daemon.address, "--timeout", "100", **keys.env("mallory"))
    assert result.returncode != 0 and "does not accept this client's key" in result.stderr, result.stderr


def test_a_peer_without_curve_cannot_talk_to_the_daemon(curve_daemon):
    with RawClient(curve_daemon.address) as raw:
        monitor = raw.socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        raw.send([Msg.STATUS])
        assert monitor.poll(int(REPLY_WAIT_S * 1000)), "no handshake outcome"
        assert recv_monitor_message(monitor)["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
        assert not raw.socket.poll(0, zmq.POLLIN)
        raw.socket.disable_monitor()
        monitor.close(0)


# ------------------------------------------------------------------------------------------------
# What travels on the wire
# ------------------------------------------------------------------------------------------------
class RecordingProxy:
    """TCP relays in front of a daemon that keep a copy of every byte passing, both ways: one
    from 127.0.0.2:PORT to 127.0.0.1:PORT for each port given (the front's, its workers'). A
    client connected to the front at 127.0.0.2 reaches its worker there too (the daemon names
    only the worker's port), so everything it sends and receives passes a relay."""

    def __init__(self, ports: list[int]) -> None:
        self.listeners = [socket.create_server(("127.0.0.2", port)) for port in ports]
        self.address = f"tcp://127.0.0.2:{ports[0]}"
        self.seen = bytearray()
        self._lock = threading.Lock()
        for listener in self.listeners:
            threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        port = listener.getsockname()[1]
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", port))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(1 << 16):
                with self._lock:
                    self.seen += data
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        for listener in self.listeners:
            listener.close()


MARKER = b"LIBREMOTE-CLEARTEXT-MARKER-0123456789"


@pytest.mark.parametrize("transport", ["curve", "plain"])
def test_tensor_bytes_on_the_wire_are_encrypted_with_curve_only(transport, keys):
    # The plain daemon is the control: it shows the recording would catch the tensor's bytes.
    worker_ports = free_port_range(4)
    flags = ("--auth-keys", str(keys.daemon_dir)) if transport == "curve" else ()
    target = Daemon(*flags, "--worker-ports", f"{worker_ports[0]}-{worker_ports[-1]}")
    proxy = RecordingProxy([int(target.address.rsplit(":", 1)[1]), *worker_ports])
    try:
        env = keys.env("alice") if transport == "curve" else {}
        result = run_python("send_a_marker_tensor.py", timeout=CLIENT_TIMEOUT_S, LIBREMOTE_SERVER=proxy.address,
                            MARKER=MARKER.decode(), **env)
        assert result.returncode == 0, result.stderr
        assert last_json(result.stdout)["equal"]
    finally:
        proxy.close()
        target.stop()
    assert (MARKER in proxy.seen) == (transport == "plain"), len(proxy.seen)


def free_port_range(count: int) -> list[int]:
    """``count`` consecutive ports free on both 127.0.0.1 and 127.0.0.2 (for the workers)."""
    for _ in range(100):
        base = free_port()
        ports = list(range(base, base + count))
        try:
            for host in ("127.0.0.1", "127.0.0.2"):
                for port in ports:
                    with socket.socket() as probe:
                        probe.bind((host, port))
            return ports
        except OSError:
            continue
    raise RuntimeError("no range of free ports")


# ------------------------------------------------------------------------------------------------
# Sessions belong to the key that opened them
# ------------------------------------------------------------------------------------------------
def admin_status(address: str, keys: Keys) -> dict:
    header = ask(address, [Msg.STATUS], keys.client("boss"))
    assert header[0] == Msg.STATUS, header
    return header[1]


def test_a_peer_reusing_a_clients_routing_id_cannot_touch_its_session(curve_daemon, keys):
    """A session belongs to the key that opened it. Another tenant's key is not even let in at the
    session's worker (it accepts its tenant's keys only); at the front the routing id stays the
    first connection's; and when the client's connection drops, its session goes at once, so
    there is no session left to take over."""
    routing_id = os.urandom(16)
    secret = torch.arange(64, dtype=torch.float32)
    victim = RawClient(curve_daemon.address, curve=keys.client("alice"), routing_id=routing_id)
    assert victim.hello()[0] == Msg.WELCOME
    victim.put(1, secret)
    session_id = victim.welcome["session"]

    with RawClient(victim.worker_address(), curve=keys.client("bob"), routing_id=routing_id) as thief:
        thief.send([Msg.BATCH, 1, [[Cmd.FETCH, 1]], True])  # straight to alice's worker, with bob's key
        assert not thief.socket.poll(3000), "alice's worker answered a client with another tenant's key"
    wait_for_log(curve_daemon, "refused a connection with an unknown CURVE key")
    with RawClient(curve_daemon.address, curve=keys.client("bob"), routing_id=routing_id) as thief:
        thief.send([Msg.HELLO, {"protocol": messages.PROTOCOL_VERSION}])  # alice's routing id is in use
        assert not thief.socket.poll(2000), "the front took a second connection with a routing id in use"

    assert torch.equal(victim.fetch(1), secret)  # untouched
    victim.close(goodbye=False)  # its connection drops: the session is reclaimed at once
    deadline = time.monotonic() + REPLY_WAIT_S
    while any(s["session"] == session_id for s in admin_status(curve_daemon.address, keys)["sessions"]):
        assert time.monotonic() < deadline, "the dropped client's session was not reclaimed"
        time.sleep(0.1)


# ------------------------------------------------------------------------------------------------
# Who sees and changes the pool
# ------------------------------------------------------------------------------------------------
def test_status_shows_a_tenant_its_own_sessions_and_the_admin_all(curve_daemon, keys):
    with RawClient(curve_daemon.address, curve=keys.client("alice")) as alice, \
            RawClient(curve_daemon.address, curve=keys.client("bob")) as bob:
        assert alice.hello(host="alice-host")[0] == Msg.WELCOME and bob.hello(host="bob-host")[0] == Msg.WELCOME
        mine = {alice.welcome["session"], bob.welcome["session"]}

        as_alice = ask(curve_daemon.address, [Msg.STATUS], keys.client("alice"))[1]
        assert {s["tenant"] for s in as_alice["sessions"]} == {"alice"}, as_alice["sessions"]
        assert alice.welcome["session"] in {s["session"] for s in as_alice["sessions"]}
        text = json.dumps(as_alice)
        assert bob.welcome["session"] not in text and "bob-host" not in text

        command = cli("status", "--server", curve_daemon.address, "--json", **keys.env("bob"))
        assert command.returncode == 0, command.stderr
        as_bob = json.loads(command.stdout)
        assert {s["tenant"] for s in as_bob["sessions"]} == {"bob"} and alice.welcome["session"] not in command.stdout

        everything = admin_status(curve_daemon.address, keys)
        assert mine <= {s["session"] for s in everything["sessions"]}
        for client in (alice, bob):
            client.send([Msg.BYE])


def test_admin_commands_need_an_admin_key(curve_daemon, keys):
    with RawClient(curve_daemon.address, curve=keys.client("alice")) as alice:
        assert alice.hello()[0] == Msg.WELCOME
        change = {"session": alice.welcome["session"], "weight": 5}
        refused = ask(curve_daemon.address, [Msg.ADMIN, change], keys.client("alice"))
        assert refused[0] == Msg.ADMIN and not refused[1]["ok"] and "admin key" in refused[1]["message"], refused
        accepted = ask(curve_daemon.address, [Msg.ADMIN, change], keys.client("boss"))
        assert accepted[1]["ok"], accepted
        row = next(s for s in admin_status(curve_daemon.address, keys)["sessions"]
                   if s["session"] == alice.welcome["session"])
        assert row["weight"] == 5.0
        with RawClient(curve_daemon.address, curve=keys.client("boss")) as boss:
            refused = boss.hello()  # an admin key is for status and admin, not for sessions
            assert refused[0] == Msg.REFUSED and "admin key" in refused[1], refused
        alice.send([Msg.BYE])


PLAIN_TENANTS = """
[admin]
token = "operator-secret"

[tenants.research]
token = "research-secret"

[tenants.interns]
token = "interns-secret"
"""


def test_plain_status_needs_the_admin_token_or_shows_a_tenant_its_own(tmp_path):
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(PLAIN_TENANTS)
    with pool_daemon("--tenants", str(tenants)) as server, RawClient(server.address) as research, \
            RawClient(server.address) as interns:
        assert research.hello(tenant="research", token="research-secret")[0] == Msg.WELCOME
        assert interns.hello(tenant="interns", token="interns-secret")[0] == Msg.WELCOME

        anonymous = ask(server.address, [Msg.STATUS])
        assert anonymous[0] == Msg.REFUSED and "admin token" in anonymous[1], anonymous
        wrong = ask(server.address, [Msg.STATUS, {"tenant": "research", "tenant_token": "interns-secret"}])
        assert wrong[0] == Msg.REFUSED, wrong
        own = ask(server.address, [Msg.STATUS, {"tenant": "research", "tenant_token": "research-secret"}])
        assert [s["session"] for s in own[1]["sessions"]] == [research.welcome["session"]], own
        admin = ask(server.address, [Msg.STATUS, {"token": "operator-secret"}])
        assert {s["session"] for s in admin[1]["sessions"]} == {research.welcome["session"], interns.welcome["session"]}

        command = cli("status", "--server", server.address, "--json",
                      LIBREMOTE_TENANT="interns", LIBREMOTE_TOKEN="interns-secret")
        assert command.returncode == 0, command.stderr
        assert research.welcome["session"] not in command.stdout and interns.welcome["session"] in command.stdout
        for client in (research, interns):
            client.send([Msg.BYE])


# ------------------------------------------------------------------------------------------------
# Plain TCP stays on loopback unless asked for
# ------------------------------------------------------------------------------------------------
def start_daemon(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "libremote_server", "--device", "cpu", *args],
                            env=subprocess_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_plain_tcp_off_loopback_needs_insecure_and_is_warned_about():
    wildcard = f"tcp://0.0.0.0:{free_port()}"
    refused = start_daemon("--listen", wildcard)
    try:
        out, _ = refused.communicate(timeout=CLIENT_TIMEOUT_S)
    finally:
        refused.kill()
    assert refused.returncode == 2, out
    assert "--auth-keys" in out and "--insecure" in out, out

    insecure = start_daemon("--listen", f"tcp://0.0.0.0:{free_port()}", "--insecure")
    try:
        lines = []
        for line in insecure.stdout:
            lines.append(line)
            if "listening on" in line:
                break
        assert any("WARNING" in line and "--insecure" in line and "unencrypted" in line for line in lines), lines
    finally:
        insecure.terminate()
        insecure.communicate(timeout=CLIENT_TIMEOUT_S)
