"""A client's side of placement: its lease, the decision, the transaction, the queue, the wait.

Used by the client library (libremote/pool.py) and by benchmarks/placement_sim.py, unchanged.
Each client holds one etcd lease (:data:`CLIENT_LEASE_TTL_S`) kept alive by a thread while the
client lives; its reservations and its place in the queue live under it, so a client that dies
frees them within the TTL, and :meth:`Placer.release` frees them at once.
"""

from __future__ import annotations

import logging
import random
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from . import queue, records, reserve
from .etcd import Etcd, EtcdUnavailable
from .placement import (
    Choice,
    Request,
    Span,
    choose_span,
    explain,
    quota_ever_allows,
    quota_refusal,
)
from .records import Waiter
from .view import DirectReader, PoolCache, PoolView

log = logging.getLogger("libremote.pool")

#: A client's lease: its reservations outlive a crashed client by at most this (plus etcd's
#: expiry check, ~0.5 s); kept alive every third of it.
CLIENT_LEASE_TTL_S = 10
#: Transactions lost to other clients in a row before the client waits for a change instead.
MAX_RACES = 50


#: Breaks ties between equally ranked daemons (placement.choose), so that racing clients spread
#: over equal room instead of all losing to the first.
_TIES = random.Random()


class PlacementError(RuntimeError):
    """The pool cannot place this request (now, or within the queue timeout); says why."""


@dataclass(frozen=True)
class Placed:
    """A placement made: one reservation per daemon of ``span`` (``rids``/``secrets`` by choice)."""

    span: Span
    rids: tuple[str, ...]
    secrets: tuple[str, ...]
    waited_s: float
    attempts: int

    @property
    def choice(self) -> Choice:
        """The first daemon's choice (all of them, for a request on one daemon)."""
        return self.span.choices[0]

    @property
    def rid(self) -> str:
        return self.rids[0]

    @property
    def token(self) -> str:
        return self.tokens[0]

    @property
    def tokens(self) -> tuple[str, ...]:
        """What each daemon of ``span.choices`` is given in HELLO (its own reservation)."""
        return tuple(reserve.claim_token(rid, secret) for rid, secret in zip(self.rids, self.secrets, strict=True))


def _fits_in(view: PoolView, policy: str) -> Callable[[Waiter], bool]:
    """Whether a waiter's request fits ``view`` now (queue.may_go's test)."""
    def fits(waiter: Waiter) -> bool:
        return Placer.fitting(view, queue.request_of(waiter, policy)) is not None
    return fits


class Placer:
    """Places requests of one client process in one pool (thread-safe for one place at a time)."""

    def __init__(self, etcd: Etcd, *, host: str = "", pid: int = 0, lease_ttl_s: int = CLIENT_LEASE_TTL_S,
                 keepalive: bool = True, reader: DirectReader | PoolCache | None = None) -> None:
        self.etcd = etcd
        self.prefix = etcd.address.prefix
        #: Where views come from: etcd each time, or a watch-fed cache (many placements per process).
        self.reader = reader or DirectReader(etcd, self.prefix)
        self.host, self.pid = host, pid
        self.lease_ttl_s = lease_ttl_s
        self.lease = 0
        self._keepalive = keepalive
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------
    def _ensure_lease(self) -> int:
        if not self.lease:
            self.lease = self.etcd.grant(self.lease_ttl_s)
            self._stop = threading.Event()  # (a fresh one: release() ended the last lease's thread)
            if self._keepalive:
                self._thread = threading.Thread(target=self._keep_alive, name="libremote-pool-lease", daemon=True)
                self._thread.start()
        return self.lease

    def _keep_alive(self) -> None:
        warned = False
        while not self._stop.wait(self.lease_ttl_s / 3):
            try:
                if self.etcd.keepalive(self.lease) < 0:
                    log.warning("libremote: this client's pool lease expired (etcd was unreachable for %d s): its "
                                "reservation is gone; the open session goes on", self.lease_ttl_s)
                    return
                warned = False
            except EtcdUnavailable as exc:
                if not warned:
                    log.warning("libremote: cannot renew this client's pool lease: %s (retrying)", exc)
                    warned = True

    def release(self) -> None:
        """Give back every reservation and queue place of this client (revoke its lease)."""
        self._stop.set()
        if self.lease:
            try:
                self.etcd.revoke(self.lease)
            except EtcdUnavailable:
                pass  # (it expires by itself)
            self.lease = 0

    # ------------------------------------------------------------------------------------------
    def place(self, request: Request, timeout_s: float, avoid: frozenset[str] = frozenset()) -> Placed:
        """Reserve devices for ``request``, waiting in the pool-wide queue up to ``timeout_s``;
        ``avoid``: daemon ids not to place on (they just refused this client)."""
        started = time.monotonic()
        deadline = started + timeout_s
        rid = uuid.uuid4().hex[:16]
        secret = secrets.token_hex(16)
        lease = self._ensure_lease()
        queue_key: str | None = None
        my_revision: int | None = None
        attempts = races = 0
        view: PoolView | None = None
        try:
            while True:
                view = self.reader.read()
                refusal = quota_ever_allows(view.quotas.get(request.tenant), request)
                if refusal:
                    raise PlacementError(f"libremote: the pool refuses {request.describe()}: {refusal}; ask its "
                                         "operator for a larger quota (libremote admin --pool ... --tenant-quota)")
                if queue_key is not None and my_revision is None:
                    my_revision = next((w.revision for w in view.waiters if w.rid == rid), None)
                span = self.fitting(view, request, avoid)
                ahead = queue.ahead_of(view.ordered_waiters(), rid, request.priority, my_revision)
                if span is not None and queue.may_go(ahead, _fits_in(view, request.policy)):
                    attempts += 1
                    # (One reservation per daemon: the first is the queue's rid; the others get
                    # their own rid and secret, so no daemon can claim another's.)
                    rids = tuple(rid if k == 0 else f"{rid}-{k}" for k in range(len(span.choices)))
                    secrets_ = (secret, *(secrets.token_hex(16) for _ in span.choices[1:]))
                    if reserve.reserve_span(self.etcd, self.prefix, view, span.choices, request, lease=lease,
                                            rids=rids, secrets=secrets_, host=self.host, pid=self.pid,
                                            created=time.time(), queue_key=queue_key):
                        return Placed(span, rids, secrets_, time.monotonic() - started, attempts)
                    races += 1
                    if races < MAX_RACES:
                        self.reader.wait_newer(view.revision, 1.0)
                        continue  # another client took it first: decide again on the new state
                races = 0
                if queue_key is None:
                    queue_key = records.queue_key(self.prefix, request.priority, rid)
                    self.etcd.put(queue_key, records.dumps(Waiter(
                        rid=rid, tenant=request.tenant, priority=request.priority, devices=request.devices,
                        memory=request.memory, model=request.model, node=request.node, exclusive=request.exclusive,
                        host=self.host, pid=self.pid, since=time.time())), lease)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise PlacementError(self._timeout_message(view, request, timeout_s, rid))
                self.reader.wait_for_change(view.revision, min(remaining, 2.0))
        except BaseException:
            if queue_key is not None:
                try:
                    self.etcd.delete(queue_key)
                except EtcdUnavailable:
                    pass  # (it leaves with the lease)
            raise

    @staticmethod
    def fitting(view: PoolView, request: Request, avoid: frozenset[str] = frozenset()) -> Span | None:
        span = choose_span(view.daemons, view.load(), request, view.live_summaries, _TIES, avoid)
        if span is None:
            return None
        if quota_refusal(view.tenant_usage(request.tenant), view.quotas.get(request.tenant), request,
                         span.choices[0].memory, span.memory_total):
            return None
        return span

    @staticmethod
    def _timeout_message(view: PoolView, request: Request, timeout_s: float, rid: str) -> str:
        quota = quota_refusal(view.tenant_usage(request.tenant), view.quotas.get(request.tenant), request,
                              request.memory or 0)
        others = sum(1 for waiter in view.waiters if waiter.rid != rid)
        return (f"libremote: the pool could not place {request.describe()} within {timeout_s:g} s "
                f"(LIBREMOTE_QUEUE_TIMEOUT); {others} other client(s) wait in its queue. "
                + (f"Its quota: {quota}. " if quota else "")
                + explain(view.daemons, view.load(), request)
                + " Ask for less (LIBREMOTE_DEVICES, LIBREMOTE_MEMORY), drop a pin (LIBREMOTE_MODEL, LIBREMOTE_NODE), "
                  "or wait longer (LIBREMOTE_QUEUE_TIMEOUT).")
