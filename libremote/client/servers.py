"""The daemons of one program: one session per daemon, and which daemon holds each ``cuda:N``.

Layer 1, the session: :mod:`.runtime` holds the program's :class:`Servers`; the layers above ask it
(through runtime) for the session of a device.

Why one :class:`~.session.ClientSession` per daemon, and not one session spanning daemons: a
session is a daemon's unit of admission, quota, scheduling and cleanup, and its command stream is
ordered by one worker. Keeping that unit whole means each daemon works exactly as with a
single-daemon client (its quotas, its priorities, its reclaiming of a dead client), and the client
routes each op to the session of its tensors' device: every remote tensor already carries the
session its handle lives in, so the per-op path needs no lookup it did not do before.

What follows from it, as on local CUDA:

- an op whose tensors are on devices of different daemons raises torch's own error for tensors on
  different devices ("Expected all tensors to be on the same device, ...") on the client, before
  anything is sent (:mod:`.dispatch`);
- ``.to("cuda:1")`` and ``copy_`` between devices of different daemons move the bytes daemon to
  daemon (:mod:`.transfer`), never through the client;
- ``torch.cuda.synchronize()`` waits for every daemon; ``device_count``, names and properties
  cover all devices; each device's memory figures are its daemon's session's;
- closing (``libremote.disconnect()``, ``connect()`` again, the process exiting) closes every
  session; a daemon that dies breaks its session, and the error names that daemon's address.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..config import Settings
from ..errors import ConnectionFailed, NotConfiguredError, Refused
from .session import ClientSession


class Servers:
    """The open sessions of a program, and the device map ``cuda:N`` -> (session, its index)."""

    def __init__(self, sessions: list[ClientSession], by_device: list[ClientSession]) -> None:
        self.sessions = sessions
        self.by_device = by_device
        #: Each device's facts, by the program's index (the daemons' WELCOME, in device order).
        self.devices: list[dict[str, Any]] = [
            session.devices[session.global_devices.index(index)] for index, session in enumerate(by_device)]

    def session_for(self, index: int) -> ClientSession:
        by_device = self.by_device
        if 0 <= index < len(by_device):
            return by_device[index]
        return by_device[0]  # (its daemon refuses the index, naming how many devices there are)

    def close(self) -> None:
        for session in self.sessions:
            session.close()


def _pinned(entry: str) -> tuple[str, int | None]:
    """``tcp://host:port#N`` -> (``tcp://host:port``, N): device N of that daemon."""
    address, mark, pin = entry.rpartition("#")
    if not mark:
        return entry, None
    if not pin.isdigit() or not address:
        raise NotConfiguredError(f"libremote: {entry!r} in LIBREMOTE_SERVER: after '#' comes a device index of that "
                                 "daemon (tcp://host:port#0)")
    return address, int(pin)


def open_servers(settings: Settings, entries: list[str], libremote_version: str) -> Servers:
    """Open one session per distinct address of ``entries`` (see :func:`libremote.config.server_entries`).

    With one entry, that daemon gives all ``LIBREMOTE_DEVICES`` devices. With several, each entry
    is one device, and ``LIBREMOTE_DEVICES`` (when set) must count them. If a daemon cannot be
    reached, the sessions already opened are closed and the error names that daemon.

    An entry may pin a device of its daemon, ``tcp://host:port#N`` (a pool's placement names
    them so): the session then asks for exactly those devices, in the entries' order, instead of
    letting the daemon place it. An address is pinned in all its entries or in none."""
    placements = [_pinned(entry) for entry in entries]
    if len(entries) == 1 and placements[0][1] is None:
        session = ClientSession(settings, entries[0], libremote_version)
        return Servers([session], [session] * len(session.devices))
    if settings.devices != len(entries):
        raise NotConfiguredError(
            f"libremote: LIBREMOTE_SERVER names {len(entries)} daemons (one device each, cuda:0..{len(entries) - 1}) "
            f"but LIBREMOTE_DEVICES={settings.devices}; leave LIBREMOTE_DEVICES unset, or name an address once per "
            "device wanted on it"
        )
    wanted: dict[str, list[int]] = {}
    pins: dict[str, list[int | None]] = {}
    for index, (address, pin) in enumerate(placements):
        wanted.setdefault(address, []).append(index)
        pins.setdefault(address, []).append(pin)
    for address, pinned in pins.items():
        if None in pinned and any(pin is not None for pin in pinned):
            raise NotConfiguredError(f"libremote: LIBREMOTE_SERVER pins some devices of {address} (#N) and not others; "
                                     "pin all its entries or none")
    return _open_sessions(settings, wanted, pins, {}, libremote_version, "LIBREMOTE_SERVER")


def open_placements(settings: Settings, placements: Sequence[Any], libremote_version: str) -> Servers:
    """One session per daemon of a pool's placements (libremote/pool.py ``resolve``: one per
    device, in ``cuda`` order), each HELLO giving that daemon's own reservation and pinning
    exactly the devices it reserves there (the daemon checks both against etcd). A program on
    one daemon gets one session, as before; spanning daemons, it is :func:`open_servers`' case
    of pinned entries. A refusal keeps its type and kind (:class:`~..errors.Refused`): the
    resolver places again when a daemon turned away a placement gone stale."""
    wanted: dict[str, list[int]] = {}
    pins: dict[str, list[int | None]] = {}
    reservations: dict[str, str] = {}
    for index, placement in enumerate(placements):
        wanted.setdefault(placement.address, []).append(index)
        pins.setdefault(placement.address, []).append(placement.device)
        reservations[placement.address] = placement.reservation
    return _open_sessions(settings, wanted, pins, reservations, libremote_version, "the pool's placement")


def _open_sessions(settings: Settings, wanted: dict[str, list[int]], pins: dict[str, list[int | None]],
                   reservations: dict[str, str], libremote_version: str, where: str) -> Servers:
    sessions: list[ClientSession] = []
    by_device: list[Any] = [None] * sum(len(indices) for indices in wanted.values())
    address = ""
    try:
        for address, indices in wanted.items():
            pinned = pins[address]
            session = ClientSession(settings, address, libremote_version, devices=len(indices), global_devices=indices,
                                    device_indices=None if pinned[0] is None else [int(p or 0) for p in pinned],
                                    reservation=reservations.get(address))
            sessions.append(session)
            for index in indices:
                by_device[index] = session
    except ConnectionFailed as exc:
        for session in sessions:
            session.close()
        if len(wanted) == 1 and where != "LIBREMOTE_SERVER":
            raise  # (one daemon: its own words say it all)
        message = (f"{exc} (opening device(s) of {address}, one of the {len(wanted)} daemons in {where}; the "
                   "sessions already opened were closed)")
        if isinstance(exc, Refused):
            raise Refused(message, address=exc.address, kind=exc.kind) from None
        raise ConnectionFailed(message) from None
    return Servers(sessions, by_device)
