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

from typing import Any

from ..config import Settings
from ..errors import ConnectionFailed, NotConfiguredError
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


def open_servers(settings: Settings, entries: list[str], libremote_version: str) -> Servers:
    """Open one session per distinct address of ``entries`` (see :func:`libremote.config.server_entries`).

    With one entry, that daemon gives all ``LIBREMOTE_DEVICES`` devices. With several, each entry
    is one device, and ``LIBREMOTE_DEVICES`` (when set) must count them. If a daemon cannot be
    reached, the sessions already opened are closed and the error names that daemon."""
    if len(entries) == 1:
        session = ClientSession(settings, entries[0], libremote_version)
        return Servers([session], [session] * len(session.devices))
    if settings.devices != len(entries):
        raise NotConfiguredError(
            f"libremote: LIBREMOTE_SERVER names {len(entries)} daemons (one device each, cuda:0..{len(entries) - 1}) "
            f"but LIBREMOTE_DEVICES={settings.devices}; leave LIBREMOTE_DEVICES unset, or name an address once per "
            "device wanted on it"
        )
    wanted: dict[str, list[int]] = {}
    for index, address in enumerate(entries):
        wanted.setdefault(address, []).append(index)
    sessions: list[ClientSession] = []
    by_device: list[Any] = [None] * len(entries)
    try:
        for address, indices in wanted.items():
            session = ClientSession(settings, address, libremote_version, devices=len(indices), global_devices=indices)
            sessions.append(session)
            for index in indices:
                by_device[index] = session
    except ConnectionFailed as exc:
        for session in sessions:
            session.close()
        raise ConnectionFailed(f"{exc} (opening device(s) of {address}, one of the {len(wanted)} daemons in "
                               "LIBREMOTE_SERVER; the sessions already opened were closed)") from None
    return Servers(sessions, by_device)
