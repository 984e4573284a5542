"""Reserving devices with an etcd transaction, and a daemon claiming the reservation.

**No double-spending.** A client decides on a :class:`~.view.PoolView` read at revision R, then
writes its reservation in one transaction that holds only if nothing was added under the chosen
devices' reservation ranges, nor under its tenant's, after R (``Compare.range_end`` over the
prefix, ``mod_revision < R+1``), the daemon is still registered and the tenant's quota is
unchanged. Two clients that decided on the same state: one transaction wins, the other re-reads
and decides again. Deletions (leases expiring, clients leaving) only ever free capacity, so they
need not fail a transaction.

**No trusted placement without the pool's checks.** The client keeps a random secret and writes
only its SHA-256 into the reservation; it gives the secret to the daemon in HELLO. The daemon
(:func:`claim`) finds the reservation under the tenant it authenticated, checks that it names
this daemon and that the secret matches, and marks it claimed in a transaction (a reservation
is good for one session), under the client's own lease, so the claim vanishes with it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from . import records
from .etcd import (
    Etcd,
    compare_absent,
    compare_mod_below,
    compare_mod_equal,
    compare_present,
    delete_op,
    put_op,
)
from .placement import Choice, Request
from .records import Reservation
from .view import PoolView


class ClaimRefused(Exception):
    """A HELLO's reservation does not hold; the message says why and what to do."""


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def reserve(etcd: Etcd, prefix: str, view: PoolView, choice: Choice, request: Request, *, lease: int, rid: str,
            secret: str, host: str = "", pid: int = 0, created: float = 0.0, queue_key: str | None = None) -> bool:
    """Write the reservation of ``choice`` for ``request`` if the pool has not changed under it
    since ``view`` was read; whether it was written. ``queue_key``: the client's place in the
    queue, deleted in the same transaction."""
    return reserve_span(etcd, prefix, view, [choice], request, lease=lease, rids=[rid], secrets=[secret], host=host,
                        pid=pid, created=created, queue_key=queue_key)


def reserve_span(etcd: Etcd, prefix: str, view: PoolView, choices: Sequence[Choice], request: Request, *,
                 lease: int, rids: Sequence[str], secrets: Sequence[str], host: str = "", pid: int = 0,
                 created: float = 0.0, queue_key: str | None = None) -> bool:
    """Write one reservation per daemon of ``choices`` (a program spanning daemons), all in one
    transaction or none: each daemon claims only its own (its own rid and secret), and the
    tenant's quota is checked against all of them at once, as for one reservation. The compares
    are the union of each choice's, so a change under any chosen device fails the whole."""
    compare = [compare_mod_below(records.tenant_reservations(prefix, request.tenant), view.revision)]
    success = []
    for choice, rid, secret in zip(choices, rids, secrets, strict=True):
        reservation = Reservation(rid=rid, daemon=choice.daemon.id, devices=choice.devices, memory=choice.memory,
                                  tenant=request.tenant, priority=request.priority,
                                  exclusive=any(d.sharing == "exclusive" for d in choice.daemon.devices
                                                if d.index in choice.devices),
                                  secret_sha256=secret_hash(secret), host=host, pid=pid, created=created)
        value = records.dumps(reservation)
        compare.append(compare_present(records.daemon_key(prefix, choice.daemon.id)))
        compare += [compare_mod_below(records.device_reservations(prefix, choice.daemon.id, index), view.revision)
                    for index in choice.devices]
        compare.append(compare_mod_below(f"{prefix}sharing/{choice.daemon.id}/", view.revision))
        success += [put_op(records.reservation_key(prefix, choice.daemon.id, index, rid), value, lease)
                    for index in choice.devices]
        success.append(put_op(records.tenant_key(prefix, request.tenant, rid), value, lease))
    quota_revision = view.quota_revisions.get(request.tenant)
    compare.append(compare_mod_equal(records.quota_key(prefix, request.tenant), quota_revision) if quota_revision
                   else compare_absent(records.quota_key(prefix, request.tenant)))
    if queue_key:
        success.append(delete_op(queue_key))
    succeeded, _ = etcd.txn(compare, success)
    return succeeded


def claim_token(rid: str, secret: str) -> str:
    """What the client sends in HELLO (``reservation``)."""
    return f"{rid}:{secret}"


def claim(etcd: Etcd, prefix: str, daemon_id: str, token: str, tenant: str) -> Reservation:
    """The daemon's check of an arriving client's reservation: the reservation it may serve, or
    :class:`ClaimRefused`. Marks it claimed (once only)."""
    rid, _, secret = token.partition(":")
    if not rid or not secret or "/" in rid:
        raise ClaimRefused("the HELLO's reservation is malformed")
    kv = etcd.get(records.tenant_key(prefix, tenant, rid))
    if kv is None:
        raise ClaimRefused(f"tenant {tenant!r} holds no reservation {rid} in this pool (it expired with the client's "
                           "lease, or was made for another tenant); connect through the pool address again")
    reservation = Reservation.loads(kv.value)
    if reservation.daemon != daemon_id:
        raise ClaimRefused(f"reservation {rid} is for daemon {reservation.daemon}, not this one ({daemon_id})")
    if not hmac.compare_digest(reservation.secret_sha256, secret_hash(secret)):
        raise ClaimRefused(f"the secret given for reservation {rid} does not match it")
    key = records.claim_key(prefix, rid)
    claimed, _ = etcd.txn([compare_present(kv.key), compare_absent(key)], [put_op(key, daemon_id, kv.lease)])
    if not claimed:
        raise ClaimRefused(f"reservation {rid} was already used for a session (one session per reservation); "
                           "connect through the pool address again")
    return reservation
