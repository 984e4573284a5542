"""Pool-wide tenant quotas and capacity under racing placements (issue 21), on real etcd with
real daemons: reservations are etcd transactions, so clients placing at once never spend the
same device slot or quota twice; ``libremote admin/status --pool`` set and show them."""

from __future__ import annotations

import json
import time

from pool_helpers import COMPUTE_CLIENT, EtcdCluster, pool_daemon, pool_view, race_placements, registered, wait_view

from libremote_wire.pool.placement import Request

from helpers import CLIENT_TIMEOUT_S, HOLDING_CLIENT, cli, finish, last_json, spawn_client, wait_for_file

GiB = 1 << 30


def test_racing_clients_never_take_a_device_past_its_sessions(tmp_path):
    with EtcdCluster(tmp_path) as etcd:
        address = etcd.address("race")
        daemon = pool_daemon(address, "n1", "--max-sessions", "3", "--memory-quota", "1GiB")
        try:
            wait_view(address, registered("n1"), "the daemon")
            won, lost = race_placements(address, [Request(tenant=f"t{i}") for i in range(10)], timeout_s=3)
            assert (len(won), len(lost)) == (3, 7), lost
            view = pool_view(address)
            assert len(view.reservations) == 3 and view.load()[(view.daemons[0].id, 0)].sessions == 3
            for placer, _ in won:
                placer.release()
        finally:
            daemon.stop()


def test_a_tenants_pool_quota_holds_across_daemons_when_placementsrace_placements(tmp_path):
    with EtcdCluster(tmp_path) as etcd:
        address = etcd.address("quota")
        daemons = [pool_daemon(address, "n1", device="cpu,cpu"), pool_daemon(address, "n2", device="cpu,cpu")]
        try:
            wait_view(address, registered("n1", "n2"), "both daemons")
            done = cli("admin", "--pool", address, "--tenant-quota", "research:memory=3GiB,devices=3")
            assert done.returncode == 0 and "quota set" in done.stdout, done
            requests = [Request(tenant="research", memory=GiB, policy="spread") for _ in range(8)]
            requests += [Request(tenant="other", memory=GiB, policy="spread") for _ in range(4)]
            won, lost = race_placements(address, requests, timeout_s=3)
            view = pool_view(address)
            assert view.tenant_usage("research").sessions == 3 and view.tenant_usage("research").memory == 3 * GiB
            assert view.tenant_usage("other").sessions == 4 and len(won) == 7
            assert all("holds 3 of its 3 devices" in message for message in lost), lost
            # A request the quota can never hold is refused at once, saying so.
            never, = race_placements(address, [Request(tenant="research", memory=4 * GiB)], timeout_s=30)[1]
            assert "the pool refuses" in never and "4GiB" in never and "tenant-quota" in never, never
            report = json.loads(cli("status", "--pool", address, "--json").stdout)
            assert report["tenants"]["research"] == {"memory": 3 * GiB, "devices": 3, "quota_memory": 3 * GiB,
                                                     "quota_devices": 3}
            assert {d["node"] for d in report["daemons"]} == {"n1", "n2"}
            assert sum(dev["placed"] for d in report["daemons"] for dev in d["devices"]) == 7
            text = cli("status", "--pool", address).stdout
            assert "research: memory 3.0GiB of 3.0GiB, devices 3 of 3" in text, text
            for placer, _ in won:
                placer.release()
            # A real client of the tenant, within its quota again, computes as local torch does.
            client = spawn_client(COMPUTE_CLIENT, address, LIBREMOTE_TENANT="research", LIBREMOTE_MEMORY="1GiB")
            out, err = finish(client, "the research client did not finish", CLIENT_TIMEOUT_S)
            assert client.returncode == 0 and last_json(out)["equal"], err
        finally:
            for daemon in daemons:
                daemon.stop()


def test_a_device_switched_to_exclusive_mode_takes_one_session_and_switches_back_only_when_empty(tmp_path):
    with EtcdCluster(tmp_path) as etcd:
        address = etcd.address("excl")
        daemon = pool_daemon(address, "n1", device="cpu,cpu")
        try:
            view = wait_view(address, registered("n1"), "the daemon")
            device = f"{view.daemons[0].id}/1"
            done = cli("admin", "--pool", address, "--exclusive", device)
            assert done.returncode == 0 and "exclusive now" in done.stdout, done
            holder = spawn_client(HOLDING_CLIENT, address, NAME="owner", DIR=str(tmp_path), LIBREMOTE_EXCLUSIVE="1")
            wait_for_file(tmp_path / "owner.in", holder)
            report = json.loads(cli("status", "--pool", address, "--json").stdout)
            rows = {dev["index"]: dev for dev in report["daemons"][0]["devices"]}
            assert rows[1]["sharing"] == "exclusive" and rows[1]["placed"] == 1 and rows[0]["sharing"] == "shared"
            assert rows[1]["reserved_memory"] == rows[1]["memory_total"]  # the whole card
            refused = cli("admin", "--pool", address, "--shared", device)
            assert refused.returncode == 1 and "switch it when it is empty" in refused.stdout, refused
            (tmp_path / "owner.go").touch()
            assert last_json(finish(holder, "the owner did not finish", CLIENT_TIMEOUT_S)[0])["admitted"]
            wait_view(address, lambda v: not v.reservations, "the owner's reservation gone", timeout=15)
            done = cli("admin", "--pool", address, "--shared", device)
            assert done.returncode == 0 and "shared now" in done.stdout, done
        finally:
            daemon.stop()


def test_real_clients_starting_at_once_take_exactly_the_free_slots_and_the_rest_queue(tmp_path):
    with EtcdCluster(tmp_path) as etcd:
        address = etcd.address("crowd")
        daemon = pool_daemon(address, "n1", "--max-sessions", "2")
        try:
            wait_view(address, registered("n1"), "the daemon")
            clients = [spawn_client(HOLDING_CLIENT, address, NAME=f"c{i}", DIR=str(tmp_path),
                                    LIBREMOTE_QUEUE_TIMEOUT="120") for i in range(5)]
            view = wait_view(address, lambda v: len(v.reservations) == 2 and len(v.waiters) == 3,
                             "2 placed and 3 queued", timeout=CLIENT_TIMEOUT_S)
            assert view.load()[(view.daemons[0].id, 0)].sessions == 2
            finished = 0
            deadline = time.monotonic() + 5 * CLIENT_TIMEOUT_S
            while finished < 5:
                # Let the admitted ones go, one at a time: each frees a slot for the next.
                assert time.monotonic() < deadline, "the queued clients were not all placed"
                admitted = sorted(path.stem for path in tmp_path.glob("c*.in"))
                released = [name for name in admitted if not (tmp_path / f"{name}.go").exists()]
                assert len(released) <= 2, admitted
                if released:
                    (tmp_path / f"{released[0]}.go").touch()
                    client = clients[int(released[0][1:])]
                    out, err = finish(client, f"{released[0]} did not finish", CLIENT_TIMEOUT_S)
                    assert last_json(out)["admitted"] and last_json(out)["total"] == 6144.0, err
                    finished += 1
                else:
                    time.sleep(0.1)  # (the next queued client is being placed and connecting)
            wait_view(address, lambda v: not v.reservations and not v.waiters, "an empty pool", timeout=15)
        finally:
            daemon.stop()
