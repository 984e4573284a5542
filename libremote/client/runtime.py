"""Process-wide client state: which daemons, the sessions with them (opened on first use), and
which device is current.

Layer 1, the session: the layers above find the session here (:func:`current` for the current
device's, :func:`session_for` for a device's, :func:`sessions` for all), and
``torch.cuda.current_device``/``set_device`` are this module's (through :mod:`.patches`). With one
daemon there is one session and all of these return it; with several, see :mod:`.servers`.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import sys
import threading
from typing import Any

import torch

from libremote_wire import __version__

from ..config import Settings, server_entries
from ..errors import ConnectionFailed, NotConfiguredError, Refused
from . import device_guard
from .servers import Servers, open_placements, open_servers
from .session import ClientSession

log = logging.getLogger("libremote")

#: The program's sessions, and the current device's session (the one ``current()`` returns at once).
_servers: Servers | None = None
_session: ClientSession | None = None
_address: str | None = None
#: The last failure to connect: raised again at once instead of waiting out another timeout.
_failure: Exception | None = None
_lock = threading.Lock()


def configured_address() -> str | None:
    return _address or Settings.from_env().server


def current() -> ClientSession:
    """The session, connecting on first use. Raises if no daemon address is known."""
    session = _session
    if session is not None:
        return session
    with _lock:
        if _session is None:
            if _failure is not None:
                raise _failure
            _open(configured_address())
        assert _session is not None
        return _session


def current_if_open() -> ClientSession | None:
    return _session


def session_for(index: int) -> ClientSession:
    """The session of the daemon that holds ``cuda:index`` (connecting on first use)."""
    servers = _servers
    if servers is None:
        current()
        servers = _servers
        assert servers is not None
    return servers.session_for(index)


def sessions() -> list[ClientSession]:
    """Every open session (none before the first use; one per daemon)."""
    servers = _servers
    return list(servers.sessions) if servers is not None else []


def devices() -> list[dict[str, Any]]:
    """The facts of every device of the program, by ``cuda`` index (connecting on first use)."""
    current()
    servers = _servers
    assert servers is not None
    return servers.devices


def connect(address: str | None = None) -> ClientSession:
    """Open a new session (closing the current one); ``address`` defaults to LIBREMOTE_SERVER."""
    global _address
    with _lock:
        if address is not None:
            _address = address
        _close()
        _open(configured_address())
        assert _session is not None
        return _session


def disconnect() -> None:
    with _lock:
        _close()


def _open(address: str | None) -> None:
    global _servers, _failure
    _failure = None
    try:
        _servers = _new_servers(address)
    except ConnectionFailed as exc:
        _failure = exc
        raise
    _select()


def _select() -> None:
    """Make ``_session`` the current device's session."""
    global _session
    servers = _servers
    _session = servers.session_for(_current_device) if servers is not None else None


def _new_servers(address: str | None) -> Servers:
    if not address:
        raise NotConfiguredError(
            "libremote: no daemon address. Set LIBREMOTE_SERVER=tcp://host:port (for example "
            "tcp://127.0.0.1:7777, where `libremote-server` listens by default) or call "
            "libremote.connect('tcp://host:port') before using the device."
        )
    settings = Settings.from_env()
    entries = server_entries(address)
    if len(entries) > 1 and not os.environ.get("LIBREMOTE_DEVICES", "").strip():
        settings = dataclasses.replace(settings, devices=len(entries))
    if settings.devices > device_guard.device_count:
        # The device guard that tells autograd how many devices exist is chosen at import.
        raise NotConfiguredError(
            f"libremote: this program asks for {settings.devices} devices (LIBREMOTE_DEVICES, or the "
            "addresses in LIBREMOTE_SERVER) after libremote was imported "
            f"(it registered support for {device_guard.device_count} device(s)); set LIBREMOTE_DEVICES "
            "or LIBREMOTE_SERVER in the environment before the program starts"
        )
    if address.startswith("etcd://"):
        return _pool_servers(settings, address)
    return open_servers(settings, entries, __version__)


#: How many times a client placed through the pool is placed again when a daemon turns its
#: placement away as stale (REFUSED kinds below) before the error reaches the program.
POOL_REPLACEMENTS = 3
#: Refusals that placing again can cure: the daemon started draining, or a reserved device went
#: unhealthy, between the pool's decision and the HELLO (the pool learns within a loop turn of
#: the daemon's, a client can be quicker); or the reservation no longer holds (its lease lapsed).
STALE_PLACEMENT = ("draining", "unhealthy", "reservation")


def _pool_servers(settings: Settings, address: str) -> Servers:
    """Sessions on the daemons the pool at ``address`` (etcd://) places this client on: one per
    daemon, each with its own reservation (libremote/pool.py, imported only here: a tcp:// client
    never loads it; :func:`.servers.open_placements`).

    The draining race: the pool decides on what etcd showed a moment ago, so a daemon may refuse
    the HELLO because it began draining, a reserved device went unhealthy, or the reservation
    lapsed. Such a refusal is not the program's business: the placement is given back and made
    again, avoiding the daemons that refused for draining or health, at most
    :data:`POOL_REPLACEMENTS` times; then the error says each refusal."""
    from .. import pool

    avoid: set[str] = set()
    refusals: list[str] = []
    last = ""
    for _ in range(POOL_REPLACEMENTS + 1):
        try:
            placements = pool.resolve(address, timeout_s=settings.queue_timeout_s, avoid=frozenset(avoid))
        except (pool.PlacementError, ValueError) as exc:
            message = str(exc) if str(exc).startswith("libremote:") else f"libremote: {exc}"
            if refusals:
                message += " (placed again after: " + "; ".join(refusals) + ")"
            raise ConnectionFailed(message) from None
        try:
            return open_placements(settings, placements, __version__)
        except Refused as exc:
            pool.release()  # (every reservation of this placement: the next one is made afresh)
            if exc.kind not in STALE_PLACEMENT:
                raise
            daemon = next((p.daemon for p in placements if p.address == exc.address), exc.address)
            if exc.kind != "reservation":
                avoid.add(daemon)
            refusals.append(f"{daemon} ({exc.address}) refused: {exc.kind}")
            last = str(exc)
            log.info("libremote: %s; placing again through %s", exc, address)
        except BaseException:
            pool.release()
            raise
    raise ConnectionFailed(
        f"libremote: the pool at {address} placed this program {POOL_REPLACEMENTS + 1} times and each time a daemon "
        "refused the placement before the session opened: " + "; ".join(refusals) + f". The last refusal: {last} -- "
        "the pool's daemons may be draining or failing faster than the pool shows it (see `libremote status --pool "
        + address + "`), or the reservations are made for a tenant the daemons do not authenticate this client as")


# ------------------------------------------------------------------------------------------------
# The current device: which of the session's devices ``cuda`` without an index names
# ------------------------------------------------------------------------------------------------
_current_device = 0


def device_index(device: Any = None) -> int:
    if device is None:
        return _current_device
    if isinstance(device, int):
        return device
    if isinstance(device, str):
        device = torch.device(device)
    if isinstance(device, torch.device):
        return _current_device if device.index is None else device.index
    raise ValueError(f"libremote: {device!r} does not name a device")


def device_facts(device: Any = None) -> dict[str, Any]:
    facts = devices()
    index = device_index(device)
    if not 0 <= index < len(facts):
        raise RuntimeError(f"libremote: device cuda:{index} does not exist; this program has {len(facts)} "
                           "(LIBREMOTE_DEVICES, or the addresses in LIBREMOTE_SERVER)")
    return facts[index]


def current_device() -> int:
    return _current_device


def set_device(device: Any) -> None:
    global _current_device
    index = device_index(device)
    if index < 0:
        return
    device_facts(index)
    _current_device = index
    _select()


def exchange_device(device: int) -> int:
    global _current_device
    previous = _current_device
    if device >= 0:
        _current_device = device
        if _servers is not None and len(_servers.sessions) > 1:
            _select()
    return previous


def _close() -> None:
    global _session, _servers
    servers, _servers, _session = _servers, None, None
    if servers is not None:
        servers.close()
    pool = sys.modules.get("libremote.pool")
    if pool is not None:
        pool.release()  # (the session's pool reservation, once the daemon has seen it end)


def _forget_after_fork() -> None:
    # The child must not use (or close) the parent's ZeroMQ socket; it connects afresh if needed.
    global _session, _servers, _lock, _failure
    _session = None
    _servers = None
    _failure = None
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
atexit.register(disconnect)
