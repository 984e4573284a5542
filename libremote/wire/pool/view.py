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
from .placement import Load, loads
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

    def load(self) -> dict[tuple[str, int], Load]:
        """What live reservations hold per device (reservations of vanished daemons do not count)."""
        alive = {daemon.id for daemon in self.daemons}
        return loads(r for r in self.reservations if r.daemon in alive)

    def tenant_usage(self, tenant: str) -> Load:
        """A tenant's reservations across the pool: memory summed over devices, devices counted."""
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
    that place many times (benchmarks/placement_sim.py), so that each placement decides on
    memory instead of reading the whole pool. Transactions still compare against etcd, so a
    view that lags only costs a retry, never a double placement."""

    def __init__(self, etcd: Etcd, prefix: str) -> None:
        self.etcd, self.prefix = etcd, prefix
        self._changed = threading.Condition()
        self._kvs: dict[str, KeyValue] = {}
        revision, kvs = etcd.range_prefix(prefix)
        self._kvs = {kv.key: kv for kv in kvs}
        self.revision = revision
        self._view: PoolView | None = None
        self._memo: dict[str, tuple[int, object]] = {}
        self._watcher = etcd.watch_prefix(prefix, revision + 1, self._on_event)

    def _on_event(self, key: str, kv: KeyValue | None, revision: int) -> None:
        with self._changed:
            if kv is None:
                self._kvs.pop(key, None)
                self._memo.pop(key, None)
            else:
                self._kvs[key] = kv
            self.revision = max(self.revision, revision)
            self._view = None
            self._changed.notify_all()

    def read(self) -> PoolView:
        with self._changed:
            if self._view is None:
                self._view = _view_of(self.prefix, self.revision, list(self._kvs.values()), self._memo)
            return self._view

    def wait_newer(self, revision: int, timeout_s: float) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self.revision > revision, timeout_s)

    def wait_for_change(self, revision: int, timeout_s: float) -> None:
        self.wait_newer(revision, timeout_s)

    def close(self) -> None:
        self._watcher()
