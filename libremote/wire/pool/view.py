"""The pool's state as one read at one revision: daemons, reservations, waiters, quotas, and
the operator's sharing modes. Everything a placement decides on comes from one of these, and
the transaction that follows compares against its revision (reserve.py)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace

from . import records
from .etcd import Etcd
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
    view = PoolView(revision)
    sharing: dict[tuple[str, int], str] = {}
    seen_reservations: set[str] = set()
    for kv in kvs:
        kind, _, rest = kv.key[len(prefix):].partition("/")
        try:
            if kind == "daemons":
                view.daemons.append(DaemonRecord.loads(kv.value))
            elif kind == "reservations":
                reservation = Reservation.loads(kv.value)
                if reservation.rid not in seen_reservations:  # (one key per device, one record)
                    seen_reservations.add(reservation.rid)
                    view.reservations.append(reservation)
            elif kind == "queue":
                view.waiters.append(Waiter.loads(kv.value, kv.create_revision))
            elif kind == "quotas":
                view.quotas[rest] = Quota.loads(kv.value)
                view.quota_revisions[rest] = kv.mod_revision
            elif kind == "claims":
                view.claims[rest] = kv.value.decode()
            elif kind == "sharing":
                daemon_id, _, index = rest.rpartition("/")
                sharing[(daemon_id, int(index))] = json.loads(kv.value)
        except (ValueError, TypeError, KeyError) as exc:
            log.debug("skipping pool record %s: %s", kv.key, exc)
    if sharing:  # the operator's word on a device's sharing mode wins over the daemon's report
        view.daemons = [replace(daemon, devices=tuple(
            replace(device, sharing=sharing.get((daemon.id, device.index), device.sharing))
            for device in daemon.devices)) for daemon in view.daemons]
    return view
