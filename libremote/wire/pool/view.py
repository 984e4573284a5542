"""The pool's state as one read at one revision: daemons, reservations, waiters, quotas, and
the operator's sharing modes. Everything a placement decides on comes from one of these, and
the transaction that follows compares against its revision (reserve.py)."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field, replace

from . import records
from .etcd import Etcd, KeyValue
from .placement import Load, Summary, loads, summarize
from .records import DaemonRecord, Quota, Reservation, Waiter

log = logging.getLogger("libremote.pool")


@dataclass
class PoolView:
    revision: int
    daemons: list[DaemonRecord] = field(default_factory=list)
    reservations: list[Reservation] = field(default_factory=list)
    waiters: list[Waiter] = field(default_factory=list)
    quotas: dict[str, Quota] = field(default_factory=dict)
    quota_revisions: dict[str, int] = field(default_factory=dict)
    claims: dict[str, str] = field(default_factory=dict)  # rid -> daemon id
    #: Kept by a PoolCache instead of computed from ``reservations`` (which it leaves empty).
    live_load: dict[tuple[str, int], Load] | None = None
    live_usage: dict[str, Load] | None = None
    live_summaries: dict[str, Summary] | None = None

    def load(self) -> dict[tuple[str, int], Load]:
        """What live reservations hold per device (reservations of vanished daemons do not count)."""
        if self.live_load is not None:
            return self.live_load
        alive = {daemon.id for daemon in self.daemons}
        self.live_load = loads(r for r in self.reservations if r.daemon in alive)  # (computed once)
        return self.live_load

    def tenant_usage(self, tenant: str) -> Load:
        """A tenant's reservations across the pool: memory summed over devices, devices counted."""
        if self.live_usage is not None:
            return self.live_usage.get(tenant, Load())
        memory = devices = 0
        for reservation in self.reservations:
            if reservation.tenant == tenant:
                memory += reservation.memory * len(reservation.devices)
                devices += len(reservation.devices)
        return Load(memory, devices)

    def ordered_waiters(self) -> list[Waiter]:
        return sorted(self.waiters, key=lambda w: (records.PRIORITY_CLASS.get(w.priority, "1"), w.revision))


def read(etcd: Etcd, prefix: str) -> PoolView:
    """Everything under the pool's prefix, at one revision (records that do not parse are
    skipped and logged: a newer daemon may write fields this release does not know)."""
    revision, kvs = etcd.range_prefix(prefix)
    return _view_of(prefix, revision, kvs)


def _parse(kind: str, kv: KeyValue) -> object:
    if kind == "daemons":
        return DaemonRecord.loads(kv.value)
    if kind == "reservations":
        return Reservation.loads(kv.value)
    if kind == "queue":
        return Waiter.loads(kv.value, kv.create_revision)
    if kind == "quotas":
        return Quota.loads(kv.value)
    if kind == "claims":
        return kv.value.decode()
    if kind == "sharing":
        return json.loads(kv.value)
    return None


def _view_of(prefix: str, revision: int, kvs: list[KeyValue],
             memo: dict[str, tuple[int, object]] | None = None) -> PoolView:
    """The view of ``kvs``; ``memo`` (key -> (mod_revision, record)) spares re-parsing records
    that did not change (PoolCache)."""
    view = PoolView(revision)
    sharing: dict[tuple[str, int], str] = {}
    seen_reservations: set[str] = set()
    for kv in kvs:
        kind, _, rest = kv.key[len(prefix):].partition("/")
        try:
            known = memo.get(kv.key) if memo is not None else None
            if known is not None and known[0] == kv.mod_revision:
                record = known[1]
            else:
                record = _parse(kind, kv)
                if memo is not None:
                    memo[kv.key] = (kv.mod_revision, record)
            if isinstance(record, DaemonRecord):
                view.daemons.append(record)
            elif isinstance(record, Reservation):
                if record.rid not in seen_reservations:  # (one key per device, one record)
                    seen_reservations.add(record.rid)
                    view.reservations.append(record)
            elif isinstance(record, Waiter):
                view.waiters.append(record)
            elif isinstance(record, Quota):
                view.quotas[rest] = record
                view.quota_revisions[rest] = kv.mod_revision
            elif kind == "claims":
                view.claims[rest] = str(record)
            elif kind == "sharing":
                daemon_id, _, index = rest.rpartition("/")
                sharing[(daemon_id, int(index))] = str(record)
        except (ValueError, TypeError, KeyError) as exc:
            log.debug("skipping pool record %s: %s", kv.key, exc)
    if sharing:  # the operator's word on a device's sharing mode wins over the daemon's report
        view.daemons = [replace(daemon, devices=tuple(
            replace(device, sharing=sharing.get((daemon.id, device.index), device.sharing))
            for device in daemon.devices)) for daemon in view.daemons]
    return view


def with_figures(etcd: Etcd, pool: str, view: PoolView) -> PoolView:
    """``view`` with each daemon's fresh figures (memory free/used, sessions, load), for people:
    ``libremote status --pool``. Placement never needs them."""
    _, kvs = etcd.range_prefix(records.figures_prefix(pool))
    fresh: dict[str, DaemonRecord] = {}
    for kv in kvs:
        try:
            record = DaemonRecord.loads(kv.value)
        except (ValueError, TypeError, KeyError):
            continue
        fresh[record.id] = record
    merged = []
    for daemon in view.daemons:
        figures = fresh.get(daemon.id)
        if figures is not None and figures.updated >= daemon.updated:
            by_index = {device.index: device for device in figures.devices}
            daemon = replace(daemon, updated=figures.updated, devices=tuple(
                replace(device, memory_free=by_index[device.index].memory_free,
                        memory_used=by_index[device.index].memory_used, sessions=by_index[device.index].sessions,
                        load=by_index[device.index].load) if device.index in by_index else device
                for device in daemon.devices))
        merged.append(daemon)
    view.daemons = merged
    return view


class DirectReader:
    """Reads the pool from etcd each time (a client process places once: one read is its view)."""

    def __init__(self, etcd: Etcd, prefix: str) -> None:
        self.etcd, self.prefix = etcd, prefix

    def read(self) -> PoolView:
        return read(self.etcd, self.prefix)

    def wait_newer(self, revision: int, timeout_s: float) -> None:
        """After a lost transaction: nothing to wait for, the next read is newer."""

    def wait_for_change(self, revision: int, timeout_s: float) -> None:
        self.etcd.wait_for_change(self.prefix, revision, timeout_s)


class PoolCache:
    """A view kept current by one etcd watch (what Kubernetes calls an informer): for processes
    that place many times (benchmarks/placement_sim.py). Each placement then decides on memory
    instead of reading the whole pool; the per-device load and the tenants' usage are kept
    incrementally as reservations come and go. Transactions still compare against etcd, so a
    view that lags or leads its revision only costs a retry, never a double placement (a view
    always shows a state at or after the revision it claims: the revision is taken first)."""

    def __init__(self, etcd: Etcd, prefix: str) -> None:
        self.etcd, self.prefix = etcd, prefix
        self._changed = threading.Condition()
        self._daemons: dict[str, DaemonRecord] = {}
        self._daemon_list: list[DaemonRecord] | None = None
        self._by_key: dict[str, tuple[str, object]] = {}  # key -> (kind, record)
        self._load: dict[tuple[str, int], Load] = {}
        self._usage: dict[str, Load] = {}
        self._waiters: dict[str, Waiter] = {}
        self._quotas: dict[str, tuple[Quota, int]] = {}
        self._sharing: dict[tuple[str, int], str] = {}
        self._summaries: dict[str, Summary] = {}
        self._dirty: set[str] = set()
        revision, kvs = etcd.range_prefix(prefix)
        for kv in kvs:
            self._apply(kv.key, kv)
        self.revision = revision
        self._watcher = etcd.watch_prefix(prefix, revision + 1, self._on_event)

    def _apply(self, key: str, kv: KeyValue | None) -> None:
        kind, _, rest = key[len(self.prefix):].partition("/")
        old = self._by_key.pop(key, None)
        if old is not None:
            self._forget(key, rest, *old)
        if kv is None:
            return
        try:
            record = _parse(kind, kv)
        except (ValueError, TypeError, KeyError):
            return
        self._by_key[key] = (kind, record)
        if isinstance(record, DaemonRecord):
            self._daemons[key] = record
            self._daemon_list = None
            self._dirty.add(record.id)
        elif isinstance(record, Reservation):
            if kind == "reservations":
                place = (record.daemon, int(rest.split("/")[1]))
                held = self._load.get(place, Load())
                self._load[place] = Load(held.memory + record.memory, held.sessions + 1)
                self._dirty.add(record.daemon)
            else:  # tenants/: the quota's side
                held = self._usage.get(record.tenant, Load())
                self._usage[record.tenant] = Load(held.memory + record.memory * len(record.devices),
                                                  held.sessions + len(record.devices))
        elif isinstance(record, Waiter):
            self._waiters[key] = record
        elif isinstance(record, Quota):
            self._quotas[rest] = (record, kv.mod_revision)
        elif kind == "sharing":
            daemon_id, _, index = rest.rpartition("/")
            self._sharing[(daemon_id, int(index))] = str(record)
            self._daemon_list = None

    def _forget(self, key: str, rest: str, kind: str, record: object) -> None:
        if isinstance(record, DaemonRecord):
            self._daemons.pop(key, None)
            self._daemon_list = None
            self._summaries.pop(record.id, None)
        elif isinstance(record, Reservation):
            if kind == "reservations":
                place = (record.daemon, int(rest.split("/")[1]))
                held = self._load.get(place, Load())
                self._load[place] = Load(held.memory - record.memory, held.sessions - 1)
                self._dirty.add(record.daemon)
            else:
                held = self._usage.get(record.tenant, Load())
                self._usage[record.tenant] = Load(held.memory - record.memory * len(record.devices),
                                                  held.sessions - len(record.devices))
        elif isinstance(record, Waiter):
            self._waiters.pop(key, None)
        elif isinstance(record, Quota):
            self._quotas.pop(rest, None)
        elif kind == "sharing":
            daemon_id, _, index = rest.rpartition("/")
            self._sharing.pop((daemon_id, int(index)), None)
            self._daemon_list = None

    def _on_event(self, key: str, kv: KeyValue | None, revision: int) -> None:
        with self._changed:
            self._apply(key, kv)
            self.revision = max(self.revision, revision)
            self._changed.notify_all()

    def read(self) -> PoolView:
        with self._changed:
            revision = self.revision
            if self._daemon_list is None:
                sharing = self._sharing
                self._daemon_list = [replace(daemon, devices=tuple(
                    replace(device, sharing=sharing[(daemon.id, device.index)])
                    if (daemon.id, device.index) in sharing else device for device in daemon.devices))
                    if sharing else daemon for daemon in self._daemons.values()]
            view = PoolView(revision, daemons=self._daemon_list, waiters=list(self._waiters.values()),
                            quotas={name: quota for name, (quota, _) in self._quotas.items()},
                            quota_revisions={name: rev for name, (_, rev) in self._quotas.items()})
            if self._dirty:
                by_id = {daemon.id: daemon for daemon in self._daemon_list}
                for daemon_id in self._dirty:
                    if daemon_id in by_id:
                        self._summaries[daemon_id] = summarize(by_id[daemon_id], self._load)
                self._dirty.clear()
            view.live_load, view.live_usage, view.live_summaries = self._load, self._usage, self._summaries
            return view

    def wait_newer(self, revision: int, timeout_s: float) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self.revision > revision, timeout_s)

    def wait_for_change(self, revision: int, timeout_s: float) -> None:
        self.wait_newer(revision, timeout_s)

    def close(self) -> None:
        self._watcher()
