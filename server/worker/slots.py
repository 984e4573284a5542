"""A worker's devices: the sessions on each and their scheduler, device time, and the watchdog.

Each device a worker serves is a :class:`DeviceSlot`: the tenant's sessions placed on it, the
scheduler that picks which of them runs next, the device time they used (host time; on a GPU
the device time beyond it, from CUDA events: :class:`SliceTimer`), and its residency manager
under oversubscription. :class:`Watchdog` is the word the front reads to end a slice that runs
past ``--op-time-limit``.
"""

from __future__ import annotations

import collections
import mmap
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from . import devices
from .residency import DeviceMemory
from .scheduler import Scheduler
from .session import Session

_UTILIZATION_WINDOW_S = 2.0
#: The watchdog word: when the running slice began (CLOCK_MONOTONIC), 0 between slices.
_WATCHDOG = struct.Struct("<d")


@dataclass
class DeviceSlot:
    """One device of this worker: its sessions and their scheduler."""

    index: int  # the daemon's index for it
    device: torch.device
    scheduler: Scheduler = field(default_factory=Scheduler)
    sessions: list[Session] = field(default_factory=list)
    memory: DeviceMemory | None = None  # residency manager, when oversubscription is on
    busy_s: float = 0.0
    utilization: float = 0.0
    timers: collections.deque[SliceTimer] = field(default_factory=collections.deque)  # in flight
    _facts: devices.DeviceFacts | None = None
    _window_start: float = field(default_factory=time.monotonic)
    _window_busy: float = 0.0

    @property
    def facts(self) -> devices.DeviceFacts:
        if self._facts is None:  # (asked lazily: on a GPU it creates the device's context)
            self._facts = devices.describe(self.device)
        return self._facts

    def settle_device_time(self) -> None:
        """Charge sessions for the device time of their finished GPU slices (see SliceTimer)."""
        while self.timers:
            extra = self.timers[0].device_extra_s()
            if extra is None:
                return
            timer = self.timers.popleft()
            session = timer.session
            assert session is not None  # (a queued timer is finished: SliceTimer.finish)
            if extra and session.slots:
                self.scheduler.charge(session, extra)
                session.busy_s += extra
                self.record_busy(extra)

    def record_busy(self, seconds: float) -> None:
        self.busy_s += seconds
        self._window_busy += seconds
        now = time.monotonic()
        if now - self._window_start >= _UTILIZATION_WINDOW_S:
            self.utilization = min(1.0, self._window_busy / (now - self._window_start))
            self._window_start, self._window_busy = now, 0.0

    def refresh_utilization(self) -> None:
        if time.monotonic() - self._window_start >= 2 * _UTILIZATION_WINDOW_S:
            self.record_busy(0.0)


class SliceTimer:
    """Device time of one slice on a GPU: events around it on the session's stream.

    A slice is charged its host time at once (kernels launch asynchronously, so that is the launch
    cost); once the events have completed, whatever the device took beyond that is charged too, so
    a session with long kernels pays for them in the fair share.
    """

    __slots__ = ("start", "end", "session", "host_s")

    def __init__(self, stream: Any) -> None:
        self.start: torch.cuda.Event | None = None  # None on the CPU backend: nothing to time
        self.end: torch.cuda.Event | None = None
        self.session: Session | None = None
        self.host_s = 0.0
        if stream is not None:
            self.start = devices.timing_event()
            self.start.record(stream)

    def finish(self, session: Session, host_s: float) -> None:
        self.end = devices.timing_event()
        self.end.record(session.stream)
        self.session, self.host_s = session, host_s

    def device_extra_s(self) -> float | None:
        """Device time beyond the host time already charged, or None while still running."""
        # Only finished timers of a GPU slice are queued (Worker._run_slices): both events exist.
        assert self.start is not None and self.end is not None
        if not devices.event_done(self.end):
            return None
        return max(0.0, float(self.start.elapsed_time(self.end)) / 1000.0 - self.host_s)


class Watchdog:
    """One word shared with the front: when the slice now running began (0 between slices).

    The front reads it every housekeeping turn and ends this process when a slice has run past
    ``--op-time-limit`` (a kernel that never returns cannot be interrupted from inside: the
    process is the unit that can be stopped). Writing it costs a store per slice."""

    def __init__(self, path: str | None) -> None:
        self._map: mmap.mmap | None = None
        if path is not None:
            with open(path, "r+b") as file:
                self._map = mmap.mmap(file.fileno(), _WATCHDOG.size)

    def started(self) -> None:
        if self._map is not None:
            _WATCHDOG.pack_into(self._map, 0, time.monotonic())

    def finished(self) -> None:
        if self._map is not None:
            _WATCHDOG.pack_into(self._map, 0, 0.0)
