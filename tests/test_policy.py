"""Unit tests of the pool's policy decisions that need no network: who may administer the pool."""

from __future__ import annotations

from libremote.server.daemon import is_loopback_peer
from libremote.server.pool import PoolConfig


def test_loopback_peers_are_recognised():
    assert is_loopback_peer("127.0.0.1") and is_loopback_peer("127.1.2.3") and is_loopback_peer("::1")
    assert is_loopback_peer("::ffff:127.0.0.1")
    for address in ("10.0.0.5", "192.168.1.10", "203.0.113.7", "::ffff:10.0.0.5", "", None):
        assert not is_loopback_peer(address), address


def test_admin_without_a_token_is_loopback_only():
    config = PoolConfig()
    assert config.admin_allowed(None, peer_is_loopback=True)
    assert not config.admin_allowed(None, peer_is_loopback=False)
    assert not config.admin_allowed("anything", peer_is_loopback=False)


def test_admin_with_a_token_needs_it_from_anywhere():
    config = PoolConfig(admin_token="operator-secret")
    assert config.admin_allowed("operator-secret", peer_is_loopback=False)
    assert config.admin_allowed("operator-secret", peer_is_loopback=True)
    assert not config.admin_allowed(None, peer_is_loopback=True)
    assert not config.admin_allowed("wrong", peer_is_loopback=True)
