"""Tenants, alice's secret and raw-client steps shared by the tests that hold tenants apart
(tests/test_tenant_isolation.py): a daemon serving alice, who holds a secret, and bob, who tries
to read it.
"""

from __future__ import annotations

import struct
from typing import Any

import torch

from libremote_wire.messages import Msg

from raw_client import RawClient

#: A tenants file: alice, bob and carol with quotas, heavy and light with weights, an admin token.
TENANTS = """
[admin]
token = "admin-secret"

[tenants.alice]
token = "alice-secret"
memory_quota = "256MiB"

[tenants.bob]
token = "bob-secret"
memory_quota = "64MiB"

[tenants.carol]
token = "carol-secret"
memory_quota = "1GiB"

[tenants.heavy]
token = "heavy-secret"
weight = 3

[tenants.light]
token = "light-secret"
weight = 1
"""

#: Alice's secret: an int64 value no computation of bob's produces by chance.
SECRET = 0x5EC2E7_A11CE_5EC2


def hello_as(client: RawClient, tenant: str) -> dict[str, Any]:
    """Say HELLO on a raw client as ``tenant`` (its token is ``TENANT-secret``); the WELCOME's fields."""
    header = client.hello(tenant=tenant, token=f"{tenant}-secret")
    assert header[0] == Msg.WELCOME, header
    return header[1]


def put_secret(alice: RawClient, handle: int = 1, count: int = 8192) -> None:
    """Alice's raw client puts ``count`` copies of the secret under ``handle``."""
    alice.put(handle, torch.full((count,), SECRET, dtype=torch.int64))


def holds_secret(data: bytes) -> int:
    """How many copies of alice's secret ``data`` holds (at any 8-byte alignment)."""
    return data.count(struct.pack("<q", SECRET))
