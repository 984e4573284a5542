"""A pool of daemons on real etcd (issue 21): registration under leases, placement through
``etcd://``, and a daemon that admits only clients the pool placed on it."""

from __future__ import annotations

from pool_helpers import COMPUTE_CLIENT, EtcdCluster, pool_daemon, pool_view, registered, wait_view

from helpers import CLIENT_TIMEOUT_S, cli, finish, last_json, run_python, spawn_client


def test_daemons_register_their_devices_and_leave_when_stopped(tmp_path):
    with EtcdCluster(tmp_path) as etcd:
        address = etcd.address("gpus")
        first = pool_daemon(address, "n1", device="cpu,cpu")
        second = pool_daemon(address, "n2")
        try:
            view = wait_view(address, registered("n1", "n2"), "both daemons")
            by_node = {daemon.node: daemon for daemon in view.daemons}
            assert by_node["n1"].address == first.address and by_node["n2"].address == second.address
            assert [d.index for d in by_node["n1"].devices] == [0, 1]
            device = by_node["n2"].devices[0]
            assert device.spec == "cpu" and device.memory_total > 0 and device.state == "ready"
            assert device.sharing == "shared" and by_node["n1"].state == "ready" and by_node["n1"].version
            assert by_node["n1"].id == f"n1:{first.port}"
        finally:
            first.stop()
        wait_view(address, registered("n2"), "n1 gone at once after it stopped (its lease revoked)", timeout=10)
        second.stop()
        assert not pool_view(address).daemons


def test_a_client_names_the_pool_and_computes_on_a_daemon_of_it(tmp_path):
    with EtcdCluster(tmp_path) as etcd:
        address = etcd.address("gpus")
        daemons = [pool_daemon(address, "n1"), pool_daemon(address, "n2")]
        try:
            wait_view(address, registered("n1", "n2"), "both daemons")
            client = spawn_client(COMPUTE_CLIENT, address)
            out, err = finish(client, "the pooled client did not finish", CLIENT_TIMEOUT_S)
            result = last_json(out)
            assert client.returncode == 0, err
            assert result["equal"] and result["address"] in {d.address for d in daemons}
            # Its reservation left with it (the client revoked its lease on the way out).
            wait_view(address, lambda v: not v.reservations and not v.claims, "the reservation gone", timeout=15)
        finally:
            for daemon in daemons:
                daemon.stop()


def test_a_pool_daemon_refuses_clients_the_pool_did_not_place(tmp_path):
    with EtcdCluster(tmp_path) as etcd:
        address = etcd.address("gpus")
        daemon = pool_daemon(address, "n1")
        try:
            wait_view(address, registered("n1"), "the daemon")
            client = spawn_client("use_a_pool_daemon_directly.py", daemon.address)
            out, err = finish(client, "the direct client did not finish", CLIENT_TIMEOUT_S)
            refusal = last_json(out)["refused"]
            assert "belongs to the pool" in refusal and "etcd://" in refusal, refusal
            # A forged reservation is refused too: the daemon checks it in etcd.
            forged = spawn_client("forge_a_reservation.py", daemon.address)
            out, err = finish(forged, "the forging client did not finish", CLIENT_TIMEOUT_S)
            refusal = last_json(out)["refused"]
            assert "holds no reservation" in refusal, refusal
            # A real reservation is good for one session: its second use is refused.
            twice = spawn_client("use_one_reservation_twice.py", address)
            out, err = finish(twice, "the client reusing its reservation did not finish", CLIENT_TIMEOUT_S)
            result = last_json(out)
            assert result["first"] and "already used for a session" in result["refused"], result
        finally:
            daemon.stop()


def test_several_devices_come_from_one_daemon_that_has_them_and_a_draining_daemon_takes_no_placements(tmp_path):
    with EtcdCluster(tmp_path) as etcd:
        address = etcd.address("multi")
        n1, n2 = pool_daemon(address, "n1", device="cpu,cpu"), pool_daemon(address, "n2", "--loopback-admin")
        try:
            wait_view(address, registered("n1", "n2"), "both daemons")
            client = spawn_client(COMPUTE_CLIENT, address, LIBREMOTE_DEVICES="2")
            out, err = finish(client, "the two-device client did not finish", CLIENT_TIMEOUT_S)
            result = last_json(out)
            assert client.returncode == 0 and result["equal"], err
            assert result["address"] == n1.address and result["devices"] == 2
            client = spawn_client(COMPUTE_CLIENT, address, LIBREMOTE_DEVICES="4", LIBREMOTE_QUEUE_TIMEOUT="1")
            out, err = finish(client, "the four-device client did not give up", CLIENT_TIMEOUT_S)
            assert client.returncode != 0
            assert "may span daemons; the pool can give 3 now (at most 2 on one daemon)" in err, err
            # An operator drains n2: the pool shows it and places nobody there.
            drained = cli("admin", "--server", n2.address, "--drain")
            assert drained.returncode == 0, drained
            wait_view(address, lambda v: {d.node: d.state for d in v.daemons}.get("n2") == "draining", "n2 draining")
            client = spawn_client(COMPUTE_CLIENT, address, LIBREMOTE_NODE="n2", LIBREMOTE_QUEUE_TIMEOUT="1")
            out, err = finish(client, "the client pinned to a draining daemon did not give up", CLIENT_TIMEOUT_S)
            assert client.returncode != 0 and "node 'n2'" in err and "n2:" in err and "draining" in err, err
        finally:
            n1.stop()
            n2.stop()


def test_connect_takes_a_pool_address_and_resolve_gives_one_placement_per_device(tmp_path):
    with EtcdCluster(tmp_path) as etcd:
        address = etcd.address("api")
        daemon = pool_daemon(address, "n1", device="cpu,cpu")
        try:
            wait_view(address, registered("n1"), "the daemon")
            done = run_python("resolve_two_devices_then_connect_to_the_pool.py", timeout=CLIENT_TIMEOUT_S, POOL=address)
            assert done.returncode == 0, done.stderr
            result = last_json(done.stdout)
            daemon_id = f"n1:{daemon.port}"
            assert result["placements"] == [[daemon.address, 0, "n1", daemon_id, True],
                                            [daemon.address, 1, "n1", daemon_id, True]]
            assert result["equal"] and result["address"] == daemon.address
            wait_view(address, lambda v: not v.reservations, "no reservation left after disconnect", timeout=15)
        finally:
            daemon.stop()
