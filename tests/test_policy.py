"""Unit tests of the pool's policy decisions that need no network: who may administer the pool
(server/auth.py), and which listen addresses are local."""

from __future__ import annotations

from libremote_server.auth import is_loopback_endpoint, is_loopback_peer, requester
from libremote_server.policy import PoolConfig


def test_loopback_peers_are_recognised():
    assert is_loopback_peer("127.0.0.1") and is_loopback_peer("127.1.2.3") and is_loopback_peer("::1")
    assert is_loopback_peer("::ffff:127.0.0.1")
    for address in ("10.0.0.5", "192.168.1.10", "203.0.113.7", "::ffff:10.0.0.5", "", None):
        assert not is_loopback_peer(address), address


def test_loopback_peers_are_admins_only_with_the_opt_in():
    config = PoolConfig()
    assert not requester(config, None, {}, "127.0.0.1", loopback_admin=False).is_admin
    assert requester(config, None, {}, "127.0.0.1", loopback_admin=True).is_admin
    assert not requester(config, None, {}, "10.0.0.5", loopback_admin=True).is_admin
    assert not requester(config, None, {"token": "anything"}, "10.0.0.5", loopback_admin=True).is_admin


def test_admin_with_a_token_needs_it_from_anywhere():
    config = PoolConfig(admin_token="operator-secret")
    assert requester(config, None, {"token": "operator-secret"}, "10.0.0.5", loopback_admin=False).is_admin
    assert requester(config, None, {"token": "operator-secret"}, "127.0.0.1", loopback_admin=False).is_admin
    assert not requester(config, None, {}, "127.0.0.1", loopback_admin=False).is_admin
    assert not requester(config, None, {"token": "wrong"}, "127.0.0.1", loopback_admin=False).is_admin


def test_a_curve_identity_decides_and_request_credentials_are_ignored():
    config = PoolConfig(admin_token="operator-secret")
    tenant = requester(config, "tenant:research", {"token": "operator-secret"}, "127.0.0.1", loopback_admin=True)
    assert (tenant.is_admin, tenant.tenant) == (False, "research")
    assert requester(config, "admin:alice", {}, "10.0.0.5", loopback_admin=False).is_admin


def test_only_loopback_listen_addresses_count_as_local():
    for endpoint in ("tcp://127.0.0.1:7777", "tcp://127.0.0.2:1", "tcp://[::1]:7777", "tcp://localhost:7777",
                     "ipc:///tmp/libremote", "inproc://daemon"):
        assert is_loopback_endpoint(endpoint), endpoint
    for endpoint in ("tcp://0.0.0.0:7777", "tcp://*:7777", "tcp://10.0.0.5:7777", "tcp://eth0:7777",
                     "tcp://gpu01:7777", "tcp://[::]:7777"):
        assert not is_loopback_endpoint(endpoint), endpoint
