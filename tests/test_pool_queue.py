"""The pool-wide queue on real etcd (issue 21): a request no daemon can hold waits, ordered by
priority class then arrival, is placed when capacity appears, and fails after
LIBREMOTE_QUEUE_TIMEOUT with what it asked for and what the pool has."""

from __future__ import annotations

import threading
import time

from pool_helpers import COMPUTE_CLIENT, EtcdCluster, pool_daemon, registered, wait_view

from libremote_wire.pool import address as pool_address
from libremote_wire.pool.etcd import Etcd
from libremote_wire.pool.placement import Request
from libremote_wire.pool.placer import Placer

from helpers import CLIENT_TIMEOUT_S, HOLDING_CLIENT, cli, finish, last_json, spawn_client, wait_for_file


def test_waiters_are_placed_by_priority_class_then_arrival_as_capacity_frees(tmp_path):
    with EtcdCluster(tmp_path) as etcd:
        address = etcd.address("q")
        daemon = pool_daemon(address, "n1", "--max-sessions", "1")
        pool = pool_address.parse(address)
        placers = []
        try:
            wait_view(address, registered("n1"), "the daemon")
            holder = Placer(Etcd(pool))
            placers.append(holder)
            holder.place(Request(tenant="t"), timeout_s=10)
            order: list[str] = []
            lock = threading.Lock()

            def wait_for_device(name: str, priority: str) -> None:
                placer = Placer(Etcd(pool))
                placers.append(placer)
                placer.place(Request(tenant="t", priority=priority), timeout_s=120)
                with lock:
                    order.append(name)
                    placers_by_name[name] = placer

            placers_by_name: dict[str, Placer] = {}
            threads = []
            for count, (name, priority) in enumerate([("low", "low"), ("normal-1", "normal"), ("normal-2", "normal"),
                                                       ("high", "high")], start=1):
                thread = threading.Thread(target=wait_for_device, args=(name, priority), daemon=True)
                thread.start()
                threads.append(thread)
                wait_view(address, lambda v, n=count: len(v.waiters) == n, f"{count} waiting")
            holder.release()
            for expected in ("high", "normal-1", "normal-2", "low"):
                deadline = time.monotonic() + 60
                while expected not in placers_by_name and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert order[-1] == expected, order
                placers_by_name[expected].release()
            assert order == ["high", "normal-1", "normal-2", "low"]
            for thread in threads:
                thread.join(timeout=10)
            wait_view(address, lambda v: not v.waiters and not v.reservations, "an empty queue", timeout=15)
        finally:
            for placer in placers:
                placer.release()
            daemon.stop()


def test_a_client_waits_for_capacity_or_gets_a_clear_error_after_its_timeout(tmp_path):
    with EtcdCluster(tmp_path) as etcd:
        address = etcd.address("q")
        daemon = pool_daemon(address, "n1", "--max-sessions", "1")
        try:
            wait_view(address, registered("n1"), "the daemon")
            holder = spawn_client(HOLDING_CLIENT, address, NAME="holder", DIR=str(tmp_path))
            wait_for_file(tmp_path / "holder.in", holder)
            # The daemon's refreshed figures show the session (gathered every --metrics-interval, 2 s).
            wait_view(address, lambda v: v.daemons[0].devices[0].sessions == 1, "the holder's session", timeout=30)
            impatient = spawn_client(COMPUTE_CLIENT, address, LIBREMOTE_QUEUE_TIMEOUT="2", LIBREMOTE_MEMORY="1GiB")
            out, err = finish(impatient, "the impatient client did not give up", CLIENT_TIMEOUT_S)
            assert impatient.returncode != 0
            assert "could not place 1 device, 1GiB each for tenant 'anonymous'" in err, err
            assert "within 2 s (LIBREMOTE_QUEUE_TIMEOUT)" in err and "the pool has: n1:" in err, err
            assert "1 placed" in err, err  # (what the pool has: the holder's reservation)
            patient = spawn_client(COMPUTE_CLIENT, address, LIBREMOTE_QUEUE_TIMEOUT="120")
            wait_view(address, lambda v: len(v.waiters) == 1, "the patient client queued")
            shown = cli("status", "--pool", address)
            assert shown.returncode == 0 and "queue (in order):" in shown.stdout, shown
            assert "1. tenant anonymous (normal): 1 x default" in shown.stdout, shown.stdout
            assert "1 waiting" in shown.stdout.splitlines()[0], shown.stdout
            (tmp_path / "holder.go").touch()
            assert last_json(finish(holder, "the holder did not finish", CLIENT_TIMEOUT_S)[0])["admitted"]
            out, err = finish(patient, "the patient client was never placed", CLIENT_TIMEOUT_S)
            assert patient.returncode == 0, err
            assert last_json(out)["equal"]
        finally:
            daemon.stop()
