"""Which daemon and devices a request gets: pure functions of the pool's state, no I/O.

binpack fills the fullest device that still fits (then the fullest daemon), keeping whole
devices and whole servers free for large requests; spread takes the emptiest, balancing load.
Pins (``LIBREMOTE_MODEL``, ``LIBREMOTE_NODE``) filter before either. Capacity is what the pool's
reservations have committed (each holds ``memory`` per device), not the daemons' last reported
free memory: reservations change in the same transaction that checks them, reports lag by seconds.

A request for N devices (:func:`choose_span`) is placed on one daemon when one can hold all N
under binpack: a program's devices on one daemon copy between each other inside it, and devices on
several daemons copy daemon to daemon over the network. When no single daemon can, or under
spread, the N devices come from several daemons (one reservation per daemon, written in one
transaction: reserve.py), and the program's ``cuda:0..N-1`` are the devices in placement order.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .records import DaemonRecord, DeviceRecord, Quota, Reservation

POLICIES = ("binpack", "spread")


@dataclass(frozen=True)
class Request:
    """What a client asks the pool for (libremote/config.py's LIBREMOTE_* variables)."""

    devices: int = 1
    memory: int | None = None  # per device; None: the daemon's --memory-quota
    model: str | None = None  # a substring of the chip's name, case-insensitive ("H100")
    node: str | None = None  # a daemon's node name
    policy: str = "binpack"
    tenant: str = "anonymous"
    priority: str = "normal"
    exclusive: bool = False  # a whole device to itself (only exclusive-mode devices)

    def describe(self) -> str:
        parts = [f"{self.devices} device{'s' if self.devices != 1 else ''}"]
        if self.memory is not None:
            parts.append(f"{_size(self.memory)} each")
        if self.model:
            parts.append(f"model {self.model!r}")
        if self.node:
            parts.append(f"node {self.node!r}")
        if self.exclusive:
            parts.append("exclusive")
        return ", ".join(parts) + f" for tenant {self.tenant!r} ({self.policy}, priority {self.priority})"


@dataclass(frozen=True)
class Load:
    """What the pool's reservations hold on one device."""

    memory: int = 0
    sessions: int = 0


@dataclass(frozen=True)
class Choice:
    daemon: DaemonRecord
    devices: tuple[int, ...]
    memory: int  # per device, as reserved


def loads(reservations: Iterable[Reservation]) -> dict[tuple[str, int], Load]:
    """Per (daemon id, device index): the memory and sessions reservations hold there."""
    totals: dict[tuple[str, int], Load] = {}
    for reservation in reservations:
        for index in reservation.devices:
            load = totals.get((reservation.daemon, index), Load())
            totals[(reservation.daemon, index)] = Load(load.memory + reservation.memory, load.sessions + 1)
    return totals


def memory_for(daemon: DaemonRecord, device: DeviceRecord, request: Request) -> int:
    """The memory a placement of ``request`` reserves on ``device`` (all of it when exclusive)."""
    if device.sharing == "exclusive":
        return device.memory_total
    return request.memory if request.memory is not None else min(daemon.session_memory, device.memory_total)


def device_fits(daemon: DaemonRecord, device: DeviceRecord, load: Load, request: Request) -> bool:
    if device.state != "ready" or not _model_matches(device, request.model):
        return False
    if device.sharing == "exclusive" or request.exclusive:  # (exclusive devices serve exclusive requests only)
        return (device.sharing == "exclusive" and request.exclusive and load.sessions == 0
                and (request.memory is None or request.memory <= device.memory_total))
    return (load.sessions < daemon.max_sessions
            and load.memory + memory_for(daemon, device, request) <= device.memory_total)


def daemon_allowed(daemon: DaemonRecord, request: Request) -> bool:
    return daemon.state == "ready" and (request.node is None or daemon.node == request.node)


@dataclass(frozen=True)
class Summary:
    """A daemon's room at a glance (kept by PoolCache as reservations come and go): what
    :func:`choose` ranks daemons by before looking at any of their devices."""

    room: int  # memory not reserved, over all its devices
    total: int
    rooms: tuple[int, ...]  # each device's room, largest first


def summarize(daemon: DaemonRecord, load: Mapping[tuple[str, int], Load]) -> Summary:
    empty = Load()
    rooms = sorted((device.memory_total - load.get((daemon.id, device.index), empty).memory
                    for device in daemon.devices), reverse=True)
    return Summary(sum(rooms), sum(device.memory_total for device in daemon.devices), tuple(rooms))


def _pick(daemon: DaemonRecord, load: Mapping[tuple[str, int], Load], request: Request
          ) -> tuple[tuple[float, float], Choice] | None:
    """The devices ``request`` would get on ``daemon`` and the daemon's score (lower is better), or None."""
    spread = request.policy == "spread"
    empty = Load()
    daemon_id = daemon.id
    fitting: list[tuple[float, int, int, DeviceRecord]] = []
    daemon_room = daemon_total = 0
    for device in daemon.devices:
        held = load.get((daemon_id, device.index), empty)
        room = device.memory_total - held.memory
        daemon_room += room
        daemon_total += device.memory_total
        if device_fits(daemon, device, held, request):
            fitting.append((-room if spread else room, held.sessions, device.index, device))
    if len(fitting) < request.devices:
        return None
    if spread:
        fitting.sort(key=lambda entry: (entry[1], entry[0], entry[2]))
    else:
        fitting.sort()
    picked = fitting[:request.devices]
    fraction = daemon_room / (daemon_total or 1)
    picked_room = float(sum(entry[0] for entry in picked))
    score = (-fraction, picked_room) if spread else (fraction, picked_room)
    return score, Choice(daemon, tuple(entry[2] for entry in picked), memory_for(daemon, picked[0][3], request))


def choose(daemons: Sequence[DaemonRecord], load: Mapping[tuple[str, int], Load], request: Request,
           summaries: Mapping[str, Summary] | None = None, ties: random.Random | None = None) -> Choice | None:
    """The daemon and devices for ``request`` by its policy, or None when none fits now.

    binpack: among daemons that can hold the request, the one with the least room left
    (fraction of its memory), and on it the devices with the least room; spread: the daemon
    with the most room, and on it the devices with the fewest placements.

    Without ``summaries``, one pass over every device (a pool of 1,000 servers of 8 is 8,000
    checks). With them (PoolCache keeps them), daemons are ranked by their summary and only
    the best-ranked are looked at device by device, until one fits: the same choice except
    between daemons of equal room, where the pass would prefer the tighter devices. ``ties``
    breaks ties between equally ranked daemons at random (clients racing for the same room
    would otherwise all pick the same daemon and all but one lose their transaction)."""
    if summaries is None:
        best: tuple[tuple[float, float, float], Choice] | None = None
        for daemon in daemons:
            if daemon.state != "ready" or (request.node is not None and daemon.node != request.node):
                continue
            picked = _pick(daemon, load, request)
            if picked is None:
                continue
            score = (*picked[0], ties.random() if ties else 0.0)
            if best is None or score < best[0]:
                best = (score, picked[1])
        return best[1] if best is not None else None
    spread = request.policy == "spread"
    count = request.devices
    ranked: list[tuple[float, float, DaemonRecord]] = []
    for daemon in daemons:
        if daemon.state != "ready" or (request.node is not None and daemon.node != request.node):
            continue
        summary = summaries.get(daemon.id)
        if summary is None:
            ranked.append((0.0, ties.random() if ties else 0.0, daemon))
            continue
        need = 0 if request.exclusive else (request.memory if request.memory is not None else daemon.session_memory)
        if len(summary.rooms) < count or summary.rooms[count - 1] < need:
            continue  # (no count devices with that much room: it cannot fit)
        fraction = summary.room / (summary.total or 1)
        ranked.append((-fraction if spread else fraction, ties.random() if ties else 0.0, daemon))
    ranked.sort(key=lambda entry: entry[:2])
    for _, _, daemon in ranked:
        picked = _pick(daemon, load, request)
        if picked is not None:
            return picked[1]
    return None


@dataclass(frozen=True)
class Span:
    """Where a request's devices go: one :class:`Choice` per daemon (each its own reservation)
    and, per requested device in the program's ``cuda`` order, (which choice, device index)."""

    choices: tuple[Choice, ...]
    order: tuple[tuple[int, int], ...]

    @property
    def memory_total(self) -> int:
        return sum(choice.memory * len(choice.devices) for choice in self.choices)


def _ranked_devices(daemon: DaemonRecord, load: Mapping[tuple[str, int], Load], request: Request
                    ) -> tuple[float, list[DeviceRecord]]:
    """The devices of ``daemon`` that can take one device of ``request``, best first by its
    policy (as :func:`_pick` ranks them), and the daemon's room (fraction of its memory free)."""
    spread = request.policy == "spread"
    empty = Load()
    fitting: list[tuple[float, int, int, DeviceRecord]] = []
    room_sum = total = 0
    for device in daemon.devices:
        held = load.get((daemon.id, device.index), empty)
        room = device.memory_total - held.memory
        room_sum += room
        total += device.memory_total
        if device_fits(daemon, device, held, request):
            fitting.append((-room if spread else room, held.sessions, device.index, device))
    fitting.sort(key=(lambda e: (e[1], e[0], e[2])) if spread else (lambda e: e[:3]))
    return room_sum / (total or 1), [entry[3] for entry in fitting]


def choose_span(daemons: Sequence[DaemonRecord], load: Mapping[tuple[str, int], Load], request: Request,
                summaries: Mapping[str, Summary] | None = None, ties: random.Random | None = None,
                avoid: frozenset[str] = frozenset()) -> Span | None:
    """Where ``request``'s devices go, over one daemon or several; None when they do not fit now.
    ``avoid``: daemon ids not to use (they refused this client's placement a moment ago).

    The rule (docs/POOL.md "Several daemons"):

    - binpack: one daemon when any can hold all N (:func:`choose`, as before: the tightest);
      otherwise the fewest daemons: those with the most devices that fit first (ties: the fuller
      daemon), and on each its tightest devices. Fewer daemons mean fewer cross-server copies.
    - spread (N > 1): the N devices one per daemon, round after round, the emptiest daemon first
      and on each its least-placed device: load is balanced over servers, not only devices.

    The program's ``cuda:0..N-1`` follow the order chosen (``Span.order``)."""
    if avoid:
        daemons = [daemon for daemon in daemons if daemon.id not in avoid]
    spread = request.policy == "spread"
    if request.devices == 1 or not spread:
        single = choose(daemons, load, request, summaries, ties)
        if single is not None:
            return Span((single,), tuple((0, index) for index in single.devices))
        if request.devices == 1:
            return None
    ranked: list[tuple[tuple[float, float, float], DaemonRecord, list[DeviceRecord]]] = []
    for daemon in daemons:
        if not daemon_allowed(daemon, request):
            continue
        fraction, fitting = _ranked_devices(daemon, load, request)
        if fitting:
            tie = ties.random() if ties else 0.0
            ranked.append(((-fraction, 0.0, tie) if spread else (-len(fitting), fraction, tie), daemon, fitting))
    if sum(len(fitting) for _, _, fitting in ranked) < request.devices:
        return None
    ranked.sort(key=lambda entry: entry[0])
    picks: list[tuple[DaemonRecord, DeviceRecord]] = []
    if spread:
        depth = 0
        while len(picks) < request.devices:
            for _, daemon, fitting in ranked:
                if depth < len(fitting) and len(picks) < request.devices:
                    picks.append((daemon, fitting[depth]))
            depth += 1
    else:
        for _, daemon, fitting in ranked:
            picks.extend((daemon, device) for device in fitting[:request.devices - len(picks)])
            if len(picks) == request.devices:
                break
    position: dict[str, int] = {}
    grouped: list[tuple[DaemonRecord, list[DeviceRecord]]] = []
    order: list[tuple[int, int]] = []
    for daemon, device in picks:
        if daemon.id not in position:
            position[daemon.id] = len(grouped)
            grouped.append((daemon, []))
        grouped[position[daemon.id]][1].append(device)
        order.append((position[daemon.id], device.index))
    choices = tuple(Choice(daemon, tuple(d.index for d in devices), memory_for(daemon, devices[0], request))
                    for daemon, devices in grouped)
    return Span(choices, tuple(order))


def quota_refusal(usage: Load, quota: Quota | None, request: Request, memory_each: int,
                  memory_total: int | None = None) -> str | None:
    """Why ``request`` would take its tenant over its pool-wide quota (None: it would not).
    ``usage`` is what the tenant's reservations hold now (memory summed, sessions = devices);
    ``memory_total``: what the placement reserves over all its devices, where it differs from
    ``memory_each`` times the devices (devices of several daemons, each reserving its own)."""
    if quota is None:
        return None
    if quota.devices is not None and usage.sessions + request.devices > quota.devices:
        return (f"tenant {request.tenant!r} holds {usage.sessions} of its {quota.devices} devices across the pool "
                f"and asks for {request.devices} more")
    asked = memory_each * request.devices if memory_total is None else memory_total
    if quota.memory is not None and usage.memory + asked > quota.memory:
        return (f"tenant {request.tenant!r} holds {_size(usage.memory)} of its {_size(quota.memory)} pool memory "
                f"quota and asks for {_size(asked)} more")
    return None


def quota_ever_allows(quota: Quota | None, request: Request) -> str | None:
    """Why ``request`` can never fit its tenant's quota, even with nothing else held."""
    return quota_refusal(Load(), quota, request, request.memory or 0)


def explain(daemons: Sequence[DaemonRecord], load: Mapping[tuple[str, int], Load], request: Request) -> str:
    """What the pool has, for an error saying why ``request`` was not placed."""
    if not daemons:
        return "the pool has no daemon registered (none started with --pool, or their leases expired)"
    lines = []
    for daemon in sorted(daemons, key=lambda d: d.id):
        free = []
        for device in daemon.devices:
            held = load.get((daemon.id, device.index), Load())
            free.append(f"{device.index}: {device.model} {device.state}/{device.sharing}, "
                        f"{_size(device.memory_total - held.memory)} of {_size(device.memory_total)} free, "
                        f"{held.sessions} placed")
        lines.append(f"{daemon.id} (node {daemon.node}, {daemon.state}): " + "; ".join(free))
    most = max((sum(1 for device in daemon.devices
                    if device_fits(daemon, device, load.get((daemon.id, device.index), Load()), request))
                for daemon in daemons if daemon_allowed(daemon, request)), default=0)
    note = ""
    if request.devices > 1:
        total = sum(sum(1 for device in daemon.devices
                        if device_fits(daemon, device, load.get((daemon.id, device.index), Load()), request))
                    for daemon in daemons if daemon_allowed(daemon, request))
        note = (f" A request for {request.devices} devices may span daemons; the pool can give {total} now "
                f"(at most {most} on one daemon).")
    return "the pool has: " + " | ".join(lines) + "." + note


def _model_matches(device: DeviceRecord, model: str | None) -> bool:
    return model is None or model.lower() in device.model.lower()


def _size(value: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if value >= 1 << shift:
            return f"{value / (1 << shift):.4g}{unit}"
    return f"{value}B"


def parse_size(text: str) -> int:
    """``8GiB``, ``512MiB``, ``1.5GB``, a byte count (the daemon's --memory-quota syntax)."""
    units = {"": 1, "b": 1, "k": 1 << 10, "kb": 10**3, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6, "mib": 1 << 20,
             "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tb": 10**12, "tib": 1 << 40}
    stripped = text.strip().lower()
    number = stripped.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = stripped[len(number):].strip()
    try:
        value = int(float(number) * units[unit])
    except (KeyError, ValueError):
        raise ValueError(f"not a size: {text!r} (e.g. 8GiB, 512MiB, 1.5GB)") from None
    if value <= 0:
        raise ValueError(f"a size must be positive: {text!r}")
    return value
