"""The client's resolver for pool addresses: ``LIBREMOTE_SERVER=etcd://h1:2379,h2:2379/NAME``.

Torch-free, and imported only when the address is ``etcd://`` (libremote/client/runtime.py).
It reads the request from the environment (libremote/config.py's table: LIBREMOTE_DEVICES,
LIBREMOTE_MEMORY, LIBREMOTE_MODEL, LIBREMOTE_NODE, LIBREMOTE_PLACEMENT, LIBREMOTE_EXCLUSIVE,
LIBREMOTE_PRIORITY, LIBREMOTE_TENANT, LIBREMOTE_QUEUE_TIMEOUT), places it with the pool's own
code (libremote_wire/pool: placement, the reservation transaction, the pool-wide queue) and
returns where to connect; the session then opens over the ordinary ``tcp://`` path, giving the
daemon the reservation's token in HELLO.

:func:`resolve` returns one :class:`Placement` per requested device, in the program's ``cuda``
order: its daemon's ``tcp://`` address, the device's index there, and that daemon's reservation.
A request no single daemon can hold (or any request of several devices under spread) spans
daemons, one reservation per daemon written in one transaction; the client then opens one
session per daemon (libremote/client/servers.py :func:`open_placements`).

The process holds one etcd lease while it lives (its reservations live under it);
:func:`release` gives them back (libremote.disconnect() calls it).
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass

from libremote_wire.pool import address as pool_address
from libremote_wire.pool.etcd import Etcd, EtcdUnavailable
from libremote_wire.pool.placement import POLICIES, Request, parse_size
from libremote_wire.pool.placer import PlacementError, Placer

__all__ = ["Placement", "PlacementError", "Request", "release", "request_from_env", "resolve"]


@dataclass(frozen=True)
class Placement:
    """One device the pool gave this client."""

    address: str  # the daemon's front, tcp://host:port
    device: int  # the device's index on that daemon
    reservation: str  # RID:SECRET, said in HELLO (the daemon checks it in etcd)
    daemon: str  # the daemon's id in the pool (NODE:PORT)
    node: str
    model: str


_lock = threading.Lock()
_placers: dict[str, Placer] = {}


def request_from_env() -> Request:
    """The request LIBREMOTE_* describe (errors name the variable and what it accepts)."""
    def env(name: str) -> str | None:
        return os.environ.get(name, "").strip() or None

    devices_raw = env("LIBREMOTE_DEVICES") or "1"
    if not devices_raw.isdigit() or int(devices_raw) < 1:
        raise ValueError(f"LIBREMOTE_DEVICES={devices_raw!r} must be a whole number, 1 or more")
    memory_raw = env("LIBREMOTE_MEMORY")
    try:
        memory = parse_size(memory_raw) if memory_raw else None
    except ValueError as exc:
        raise ValueError(f"LIBREMOTE_MEMORY: {exc}") from None
    policy = (env("LIBREMOTE_PLACEMENT") or "binpack").lower()
    if policy not in POLICIES:
        raise ValueError(f"LIBREMOTE_PLACEMENT={policy!r}: use binpack or spread")
    priority = (env("LIBREMOTE_PRIORITY") or "normal").lower()
    if priority not in ("high", "normal", "low"):
        raise ValueError(f"LIBREMOTE_PRIORITY={priority!r}: use high, normal or low")
    key = env("LIBREMOTE_CLIENT_KEY")
    # With CURVE the daemon takes the tenant from the key (NAME.key_secret, NAME.laptop.key_secret:
    # NAME); a reservation made under another name is refused by the daemon, not just unused.
    tenant = env("LIBREMOTE_TENANT") or (os.path.basename(key).partition(".")[0] if key else "anonymous")
    return Request(devices=int(devices_raw), memory=memory, model=env("LIBREMOTE_MODEL"), node=env("LIBREMOTE_NODE"),
                   policy=policy, tenant=tenant, priority=priority,
                   exclusive=(env("LIBREMOTE_EXCLUSIVE") or "").lower() in ("1", "true", "yes", "on"))


def resolve(address: str, request: Request | None = None, *, timeout_s: float | None = None,
            avoid: frozenset[str] = frozenset()) -> list[Placement]:
    """Place ``request`` (default: from the environment) in the pool at ``address``, waiting in
    the pool-wide queue up to ``timeout_s`` (default LIBREMOTE_QUEUE_TIMEOUT, 300 s). ``avoid``:
    daemon ids (``Placement.daemon``) not to place on, because they refused this client's last
    placement (draining, a device gone unhealthy) before the pool showed it. Raises
    :class:`PlacementError` (what was asked, what the pool has) or ValueError (a bad address
    or variable)."""
    pool = pool_address.parse(address)
    request = request or request_from_env()
    if timeout_s is None:
        raw = os.environ.get("LIBREMOTE_QUEUE_TIMEOUT", "").strip()
        timeout_s = float(raw) if raw else 300.0
    with _lock:
        placer = _placers.get(str(pool))
        if placer is None:
            placer = _placers[str(pool)] = Placer(Etcd(pool, pool_address.Credentials.from_env()),
                                                  host=socket.gethostname(), pid=os.getpid())
    try:
        placed = placer.place(request, timeout_s, avoid)
    except EtcdUnavailable as exc:
        raise PlacementError(f"libremote: cannot reach the pool's etcd ({exc}); check LIBREMOTE_SERVER={address} "
                             "and that etcd runs there") from None
    placements = []
    for position, index in placed.span.order:
        daemon = placed.span.choices[position].daemon
        models = {device.index: device.model for device in daemon.devices}
        placements.append(Placement(address=daemon.address, device=index, reservation=placed.tokens[position],
                                    daemon=daemon.id, node=daemon.node, model=models.get(index, "")))
    return placements


def release() -> None:
    """Give back this process's reservations and queue places in every pool (revoke its leases)."""
    with _lock:
        placers = list(_placers.values())
        _placers.clear()
    for placer in placers:
        placer.release()
        placer.etcd.close()
