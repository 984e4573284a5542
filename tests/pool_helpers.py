"""Helpers for the pool's tests (issue 21): daemons joined to a pool on real etcd, the pool's
registry as etcd holds it, and client programs placed through ``etcd://``.

Daemons are tests/conftest.py's :class:`Daemon` with ``--pool``; etcd is tests/etcd_cluster.py's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from etcd_cluster import EtcdCluster  # noqa: F401  (re-exported)

from libremote_wire.pool import address as pool_address
from libremote_wire.pool.etcd import Etcd, EtcdUnavailable
from libremote_wire.pool.placement import Request
from libremote_wire.pool.placer import PlacementError, Placer
from libremote_wire.pool.view import PoolView, read, with_figures

from conftest import Daemon

#: Computes on its pooled device, checks the result against local torch and prints which daemon
#: it got (JSON).
COMPUTE_CLIENT = "compute_on_the_pool.py"


def pool_daemon(etcd_address: str, node: str, *args: str, device: str = "cpu") -> Daemon:
    return Daemon("--pool", etcd_address, "--node-name", node, *args, device=device)


def pool_view(etcd_address: str) -> PoolView:
    address = pool_address.parse(etcd_address)
    etcd = Etcd(address)
    try:
        return with_figures(etcd, address.pool, read(etcd, address.prefix))
    finally:
        etcd.close()


def wait_view(etcd_address: str, predicate: Callable[[PoolView], bool], what: str, timeout: float = 60.0) -> PoolView:
    """Poll the pool's registry until ``predicate`` holds (fail after ``timeout``)."""
    deadline = time.monotonic() + timeout
    view = None
    while time.monotonic() < deadline:
        try:
            view = pool_view(etcd_address)
        except EtcdUnavailable:  # (a member being killed: try again)
            time.sleep(0.1)
            continue
        if predicate(view):
            return view
        time.sleep(0.1)
    raise AssertionError(f"the pool never showed {what} within {timeout} s; last: {view}")


def registered(*nodes: str) -> Callable[[PoolView], bool]:
    return lambda view: sorted(d.node for d in view.daemons) == sorted(nodes)


def race_placements(address: str, requests: list[Request], timeout_s: float) -> tuple[list[tuple[Placer, Request]], list[str]]:
    """Place every request at once, each from its own client (thread, lease): the winners, each
    with its request, and the losers' errors. The losers' placers are released and closed; the
    caller releases the winners'."""
    pool = pool_address.parse(address)
    placers = [Placer(Etcd(pool)) for _ in requests]
    won: list[tuple[Placer, Request]] = []
    lost: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(len(requests))

    def place(placer: Placer, request: Request) -> None:
        start.wait()
        try:
            placer.place(request, timeout_s)
            with lock:
                won.append((placer, request))
        except PlacementError as exc:
            with lock:
                lost.append(str(exc))

    threads = [threading.Thread(target=place, args=pair) for pair in zip(placers, requests)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for placer in placers:
        if all(placer is not winner for winner, _ in won):
            placer.release()  # (the losers' leases: nothing left under them)
            placer.etcd.close()
    return won, lost
