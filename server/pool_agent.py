"""The daemon's membership of a pool (``--pool etcd://h1:2379,h2:2379/NAME``): it registers
itself and its devices in etcd under a lease it keeps alive, and checks the reservations of
arriving clients. Torch-free, like the rest of the front.

**Lease and figures.** The record (``daemons/NODE:PORT``: address, node, devices with model,
memory total/free/used, sessions, load, state and sharing mode, version) lives under a lease of
:data:`LEASE_TTL_S` seconds renewed every :data:`KEEPALIVE_S`; the front hands the agent fresh
figures every :data:`REFRESH_S`, written beside the pool's prefix (records.figures_prefix); the
record itself is rewritten only when what placement reads changes. A daemon that stops revokes the lease (it leaves at once); one
that dies leaves when the lease expires: within ``LEASE_TTL_S`` plus etcd's expiry check.

**etcd unreachable.** Nothing the daemon's clients do waits on etcd: sessions run between the
client and its worker, and registration is this thread's business. When no etcd member answers,
the agent logs it once, retries with backoff (1 s doubling up to :data:`MAX_BACKOFF_S`), and on
return registers again under a new lease (the old one will have expired). Only new pool clients
wait (their reservations cannot be checked without etcd).

**Claims.** A client placed through the pool says HELLO with its reservation's token;
:meth:`PoolAgent.verify` checks it against etcd in a small thread pool (the front's loop never
blocks on the network) and the front admits the client on exactly the reserved devices.
"""

from __future__ import annotations

import concurrent.futures
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from libremote_wire import __version__
from libremote_wire.pool import records, reserve
from libremote_wire.pool.address import Credentials, PoolAddress
from libremote_wire.pool.etcd import Etcd, EtcdUnavailable
from libremote_wire.pool.records import DaemonRecord, DeviceRecord, Reservation

from .admission import FrontDevice
from .policy import PoolConfig
from .telemetry.collect import Telemetry

log = logging.getLogger("libremote.server.pool")

#: The daemon's lease: a dead daemon leaves the pool within this many seconds (plus etcd's
#: expiry check, ~0.5 s). Short enough that clients are not sent to a dead daemon for long,
#: long enough that a busy etcd or a paused process does not drop a live one.
LEASE_TTL_S = 5
#: How often the lease is renewed (a fifth of the TTL: four renewals may fail before it lapses).
KEEPALIVE_S = 1.0
#: How often the figures (memory, sessions, load) are fresh: the front gathers them every
#: --metrics-interval (2 s by default) and hands the agent its record every loop turn (0.25 s);
#: the agent writes only what changed (a drain or an unhealthy device: at once).
REFRESH_S = 2.0
MAX_BACKOFF_S = 10.0


class PoolAgent:
    """Registration thread and claim checks of one daemon in one pool."""

    def __init__(self, address: PoolAddress, credentials: Credentials, daemon_id: str) -> None:
        self.address = address
        self.prefix = address.prefix
        self.daemon_id = daemon_id
        self.key = records.daemon_key(self.prefix, daemon_id)
        self._etcd = Etcd(address, credentials)
        self._claims_etcd = Etcd(address, credentials)
        self._record: DaemonRecord | None = None
        self._written: str | None = None
        self._figures: str | None = None
        self.figures_key = records.figures_prefix(address.pool) + daemon_id
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._changed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="libremote-pool-agent", daemon=True)
        self._claims = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="libremote-pool-claim")
        self.lease = 0
        self.registered = False

    def start(self, record: DaemonRecord) -> None:
        self.update(record)
        self._thread.start()

    def update(self, record: DaemonRecord) -> None:
        """New figures from the front's loop (written by the agent's thread)."""
        with self._lock:
            self._record = record
        self._changed.set()

    def verify(self, token: str, tenant: str) -> concurrent.futures.Future[Reservation]:
        """Check and claim a HELLO's reservation; the future raises ClaimRefused or EtcdUnavailable."""
        return self._claims.submit(reserve.claim, self._claims_etcd, self.prefix, self.daemon_id, token, tenant)

    def stop(self) -> None:
        """Leave the pool now (revoke the lease) and stop the thread."""
        self._stop.set()
        self._changed.set()
        self._thread.join(timeout=5)
        self._claims.shutdown(wait=False, cancel_futures=True)
        if self.lease:
            try:
                self._etcd.revoke(self.lease)
                log.info("left pool %s", self.address)
            except EtcdUnavailable as exc:
                log.warning("could not leave pool %s cleanly (%s): the record expires within %d s", self.address,
                            exc, LEASE_TTL_S)
        self._etcd.close()
        self._claims_etcd.close()

    # ------------------------------------------------------------------------------------------
    def _run(self) -> None:
        backoff = 1.0
        failing = False
        next_keepalive = 0.0
        while not self._stop.is_set():
            try:
                now = time.monotonic()
                if not self.lease:
                    self.lease = self._etcd.grant(LEASE_TTL_S)
                    self._written = self._figures = None
                    next_keepalive = now + KEEPALIVE_S
                elif now >= next_keepalive:
                    next_keepalive = now + KEEPALIVE_S
                    if self._etcd.keepalive(self.lease) < 0:
                        log.warning("this daemon's pool lease expired (etcd was out of reach longer than %d s): "
                                    "registering again", LEASE_TTL_S)
                        self.lease = 0
                        continue
                self._write()
                if failing:
                    log.warning("etcd of pool %s reachable again: registered as %s", self.address, self.daemon_id)
                failing, backoff = False, 1.0
                self._changed.wait(max(0.0, next_keepalive - time.monotonic()))
                self._changed.clear()
            except EtcdUnavailable as exc:
                if not failing:
                    log.error("cannot reach the etcd of pool %s: %s. Clients already here go on; new pool clients "
                              "cannot be placed here until it answers (retrying with backoff, logged once)",
                              self.address, exc)
                failing = True
                self.registered = False
                self._stop.wait(backoff)
                backoff = min(MAX_BACKOFF_S, backoff * 2)
            except Exception:  # (a bug here must not end the daemon)
                log.exception("pool agent failed; retrying")
                self._stop.wait(backoff)

    def _write(self) -> None:
        with self._lock:
            record = self._record
        if record is None:
            return
        placed_by = records.dumps(records.placement_view(record))
        if placed_by != self._written:  # (what placement reads changed: clients waiting are woken)
            self._etcd.put(self.key, records.dumps(record), self.lease)
            if not self.registered:
                log.info("joined pool %s as %s (%s, %d devices; lease %d s)", self.address, self.daemon_id,
                         record.address, len(record.devices), LEASE_TTL_S)
            self.registered = True
            self._written = placed_by
        figures = records.dumps(record)
        if figures != self._figures:
            self._etcd.put(self.figures_key, figures, self.lease)
            self._figures = figures


class MemberState(Protocol):
    """What the record is made of: the front's registry (front.py's ``Front`` is one)."""

    address: str
    pool: PoolConfig
    devices: list[FrontDevice]
    draining: str | None
    telemetry: Telemetry | None


def build_record(front: MemberState, *, daemon_id: str, node: str, advertise: str) -> DaemonRecord:
    """The daemon's record from the front's devices and its last published figures."""
    latest = front.telemetry.latest if front.telemetry is not None else None
    rows = {row["index"]: row for row in (latest or {}).get("status", {}).get("devices", ())}
    devices = []
    for device in front.devices:
        row = rows.get(device.index, {})
        total = int(row.get("memory_total") or device.total_memory or front.pool.default_memory_quota)
        state = "unhealthy" if device.unhealthy else ("draining" if front.draining else "ready")
        devices.append(DeviceRecord(
            index=device.index, model=device.name, spec=device.spec, memory_total=total,
            memory_free=int(row.get("memory_free", total)), memory_used=int(row.get("memory_used", 0)),
            sessions=len(device.sessions), load=float(row.get("utilization", 0.0)), state=state))
    state = "draining" if front.draining else ("unhealthy" if devices and all(d.state == "unhealthy" for d in devices)
                                               else "ready")
    return DaemonRecord(id=daemon_id, address=advertise, node=node, version=__version__, state=state,
                        session_memory=front.pool.default_memory_quota,
                        max_sessions=front.pool.max_sessions_per_device or 1 << 16, devices=tuple(devices),
                        updated=float((latest or {}).get("time", 0.0)))  # (when the figures were gathered)


def advertised_address(listen: str, given: str | None) -> str:
    """Where clients reach this daemon: ``--pool-advertise``, else the bound address with a
    wildcard host replaced by this host's name."""
    if given:
        return given
    host, _, port = listen.removeprefix("tcp://").rpartition(":")
    if host in ("0.0.0.0", "*", "[::]", "::"):
        host = socket.getfqdn()
    return f"tcp://{host}:{port}"


@dataclass(frozen=True)
class Membership:
    """``--pool`` and its companions, as the command line gave them."""

    address: PoolAddress
    credentials: Credentials
    node: str
    advertise: str | None = None

    def agent(self, bound: str) -> tuple[PoolAgent, str, str]:
        """The agent for a front bound at ``bound``; with its daemon id and advertised address."""
        daemon_id = f"{self.node}:{bound.rsplit(':', 1)[1]}"
        return PoolAgent(self.address, self.credentials, daemon_id), daemon_id, advertised_address(bound, self.advertise)
