"""Parse a pool address, ``etcd://host1:2379,host2:2379/poolname``, and the credentials etcd
wants from the environment.

Credentials never travel in the address (it is printed in logs and status): they come from

=============================  ===================================================================
variable                       meaning
=============================  ===================================================================
LIBREMOTE_ETCD_USER            etcd user name (etcd ``--auth`` enabled: ``etcdctl auth enable``)
LIBREMOTE_ETCD_PASSWORD_FILE   a file holding that user's password (or LIBREMOTE_ETCD_PASSWORD)
LIBREMOTE_ETCD_CA              CA bundle that signed etcd's server certificates: speak HTTPS
LIBREMOTE_ETCD_CERT            client certificate (etcd ``--client-cert-auth``), with ...
LIBREMOTE_ETCD_KEY             ... its private key
=============================  ===================================================================

The daemon takes the same as flags (``--etcd-user``, ``--etcd-password-file``, ``--etcd-ca``,
``--etcd-cert``, ``--etcd-key``), which win over the environment.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace

SCHEME = "etcd://"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class PoolAddressError(ValueError):
    """A pool address that cannot be used; the message says what is wrong and the right form."""


@dataclass(frozen=True)
class Credentials:
    """How to authenticate to etcd: a user and password, and/or TLS files (all optional)."""

    user: str | None = None
    password: str | None = None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    @property
    def tls(self) -> bool:
        return self.ca is not None or self.cert is not None

    @classmethod
    def from_env(cls) -> Credentials:
        def env(name: str) -> str | None:
            return os.environ.get(name, "").strip() or None

        password = env("LIBREMOTE_ETCD_PASSWORD")
        password_file = env("LIBREMOTE_ETCD_PASSWORD_FILE")
        if password_file:
            password = read_secret(password_file, "LIBREMOTE_ETCD_PASSWORD_FILE")
        return cls(user=env("LIBREMOTE_ETCD_USER"), password=password, ca=env("LIBREMOTE_ETCD_CA"),
                   cert=env("LIBREMOTE_ETCD_CERT"), key=env("LIBREMOTE_ETCD_KEY"))

    def overridden(self, **given: str | None) -> Credentials:
        """These credentials with the non-empty ``given`` ones instead (command-line flags)."""
        return replace(self, **{name: value for name, value in given.items() if value})


def read_secret(path: str, what: str) -> str:
    try:
        with open(path) as handle:
            secret = handle.read().strip()
    except OSError as exc:
        raise PoolAddressError(f"{what}: cannot read {path}: {exc}") from None
    if not secret:
        raise PoolAddressError(f"{what}: {path} is empty")
    return secret


@dataclass(frozen=True)
class PoolAddress:
    """Where the pool's etcd is and which pool (one etcd cluster can hold several)."""

    endpoints: tuple[tuple[str, int], ...]
    pool: str

    @property
    def prefix(self) -> str:
        """Every key of this pool starts with this."""
        return f"/libremote/pools/{self.pool}/"

    def __str__(self) -> str:
        return SCHEME + ",".join(f"{host}:{port}" for host, port in self.endpoints) + "/" + self.pool


def is_pool_address(address: str | None) -> bool:
    return bool(address) and str(address).startswith(SCHEME)


def parse(address: str) -> PoolAddress:
    """``etcd://h1:2379,h2:2379/poolname`` (the port defaults to 2379; the pool name is required)."""
    usage = "use etcd://HOST:PORT[,HOST:PORT...]/POOLNAME, e.g. etcd://10.0.0.1:2379,10.0.0.2:2379/gpus"
    if not address.startswith(SCHEME):
        raise PoolAddressError(f"{address!r} is not a pool address: {usage}")
    hosts, slash, pool = address[len(SCHEME):].partition("/")
    pool = pool.strip("/")
    if not slash or not _NAME.match(pool):
        raise PoolAddressError(f"{address!r} names no pool (letters, digits, '.', '_', '-'): {usage}")
    endpoints = []
    for part in hosts.split(","):
        host, _, port = part.strip().rpartition(":") if ":" in part else (part.strip(), ":", "2379")
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise PoolAddressError(f"{address!r}: {part!r} is not HOST:PORT: {usage}")
        endpoints.append((host, int(port)))
    return PoolAddress(tuple(endpoints), pool)
