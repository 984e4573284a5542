"""The pool without a single point of failure (issue 21), on loopback with a 3-member etcd
cluster: the etcd leader dies and a daemon dies while a program trains on another daemon; the
program's results stay exact, new placements succeed, and the dead daemon leaves the registry
within its lease. The bounds asserted are generous; the measured times are printed
(``pytest -s``) and stated in docs/POOL.md.

No leader or scheduler process exists to fail: clients place themselves with etcd
transactions, daemons are peers, and etcd is replicated."""

from __future__ import annotations

import json
import time
import urllib.request

from pool_helpers import COMPUTE_CLIENT, EtcdCluster, pool_daemon, registered, wait_view

from libremote_server.pool_agent import LEASE_TTL_S
from libremote_wire.pool import address as pool_address
from libremote_wire.pool.etcd import Etcd
from libremote_wire.pool.placement import Request
from libremote_wire.pool.placer import Placer

from helpers import CLIENT_TIMEOUT_S, finish, last_json, spawn_client, wait_for_file


def _leader(cluster: EtcdCluster) -> int:
    """The index of the member that leads the cluster now."""
    for index, member in enumerate(cluster.members):
        try:
            request = urllib.request.Request(f"http://{member.endpoint}/v3/maintenance/status", data=b"{}",
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=2) as answer:
                status = json.loads(answer.read())
            if status.get("leader") == status["header"]["member_id"]:
                return index
        except OSError:
            continue
    raise AssertionError("no etcd member says it leads")


def test_training_goes_on_and_placements_succeed_when_the_etcd_leader_and_a_daemon_die(tmp_path):
    with EtcdCluster(tmp_path, members=3) as etcd:
        address = etcd.address("ha")
        n1 = pool_daemon(address, "n1", "--max-sessions", "4")
        n2 = pool_daemon(address, "n2", "--max-sessions", "4")
        placers: list[Placer] = []
        try:
            wait_view(address, registered("n1", "n2"), "both daemons")
            trainer = spawn_client("train_in_two_halves_on_the_pool.py", address, DIR=str(tmp_path), LIBREMOTE_NODE="n2")
            wait_for_file(tmp_path / "half.done", trainer, timeout=CLIENT_TIMEOUT_S)

            # 1. The etcd leader dies: the next placement goes through the surviving members.
            leader = _leader(etcd)
            killed = time.monotonic()
            etcd.kill(leader)
            placer = Placer(Etcd(pool_address.parse(address)))
            placers.append(placer)
            placed = placer.place(Request(tenant="after-leader", memory=1 << 20), timeout_s=60)
            placement_after_leader_s = time.monotonic() - killed
            assert placed.choice.daemon.node in ("n1", "n2")
            assert placement_after_leader_s < 30, placement_after_leader_s

            # 2. A daemon dies (SIGKILL: no goodbye): it leaves the registry when its lease expires.
            killed = time.monotonic()
            n1.process.kill()
            n1.process.wait()
            wait_view(address, registered("n2"), "n1 gone after its lease expired", timeout=60)
            daemon_gone_s = time.monotonic() - killed
            assert daemon_gone_s <= LEASE_TTL_S + 5, daemon_gone_s

            # 3. New clients are placed on the survivor and compute exactly.
            client = spawn_client(COMPUTE_CLIENT, address)
            out, err = finish(client, "a client placed after the failures did not finish", CLIENT_TIMEOUT_S)
            assert client.returncode == 0, err
            result = last_json(out)
            assert result["equal"] and result["address"] == n2.address

            # 4. The program that trained through all of it has exact results.
            (tmp_path / "go").touch()
            out, err = finish(trainer, "the training client did not finish", CLIENT_TIMEOUT_S)
            assert trainer.returncode == 0, err
            result = last_json(out)
            assert result["losses_equal"] and result["params_equal"] and result["address"] == n2.address, result
            print(json.dumps({"etcd_leader_killed_to_next_placement_s": round(placement_after_leader_s, 2),
                              "daemon_killed_to_gone_from_registry_s": round(daemon_gone_s, 2),
                              "daemon_lease_ttl_s": LEASE_TTL_S}))
        finally:
            for placer in placers:
                placer.release()
            n1.stop()
            n2.stop()


def test_a_daemon_keeps_serving_while_etcd_is_gone_and_registers_again_when_it_returns(tmp_path):
    with EtcdCluster(tmp_path) as etcd:
        address = etcd.address("lonely")
        daemon = pool_daemon(address, "n1")
        try:
            wait_view(address, registered("n1"), "the daemon")
            trainer = spawn_client("train_in_two_halves_on_the_pool.py", address, DIR=str(tmp_path))
            wait_for_file(tmp_path / "half.done", trainer, timeout=CLIENT_TIMEOUT_S)
            etcd.stop()  # all of etcd: the session runs between the client and its worker
            time.sleep(LEASE_TTL_S + 1)
            (tmp_path / "go").touch()
            out, err = finish(trainer, "the client did not finish while etcd was down", CLIENT_TIMEOUT_S)
            assert trainer.returncode == 0, err
            result = last_json(out)
            assert result["losses_equal"] and result["params_equal"], result
            assert daemon.process.poll() is None
            assert daemon.log().count("cannot reach the etcd of pool") == 1, daemon.log()  # logged once
            for member in etcd.members:  # etcd back (same data): the daemon registers again
                member.start(etcd.binary, etcd.initial, state="existing")
            etcd.wait_healthy()
            # (etcd restores the old lease on restart; the agent renews it or registers anew)
            deadline = time.monotonic() + 60
            while "reachable again" not in daemon.log() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert "reachable again" in daemon.log(), daemon.log()
            wait_view(address, registered("n1"), "the daemon registered again", timeout=60)
        finally:
            daemon.stop()
