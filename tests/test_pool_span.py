"""One program's devices over several daemons of the pool (the pool meets aggregation), and the
draining race, on real etcd with real daemons on loopback.

``LIBREMOTE_SERVER=etcd://.../NAME`` with ``LIBREMOTE_DEVICES=N``: when no single daemon has N
devices (or under spread), the pool reserves them on several daemons, one reservation per daemon
in one etcd transaction (libremote_wire/pool/reserve.py ``reserve_span``); the client opens one
session per daemon, each HELLO with its own reservation and pinned devices
(libremote/client/servers.py ``open_placements``), and ``cuda:0..N-1`` follow the placement's
order. A daemon that turns a placement away as stale (it began draining, a device went
unhealthy, the reservation lapsed) is not the program's business: the client places itself
again (libremote/client/runtime.py ``_pool_servers``), a bounded number of times.
"""

from __future__ import annotations

import json

from pool_helpers import EtcdCluster, pool_daemon, pool_view, race_placements, registered, wait_view

from libremote_wire.pool.placement import Request

from helpers import CLIENT_TIMEOUT_S, cli, finish, last_json, run_python, spawn_client, wait_for_file

GiB = 1 << 30

def test_two_devices_through_the_pool_span_two_one_device_daemons_and_a_pipeline_step_equals_local_cpu(tmp_path):
    with EtcdCluster(tmp_path) as etcd:
        address = etcd.address("span")
        n1, n2 = pool_daemon(address, "n1"), pool_daemon(address, "n2")
        try:
            wait_view(address, registered("n1", "n2"), "both daemons")
            done = run_python("pipeline_over_two_devices.py", timeout=CLIENT_TIMEOUT_S, LIBREMOTE_SERVER=address, LIBREMOTE_DEVICES="2")
            assert done.returncode == 0, done.stderr[-5000:]
            out = last_json(done.stdout)
            assert out["count"] == 2 and out["sessions"] == 2, out
            assert sorted(out["addresses"]) == sorted([n1.address, n2.address]), out
            assert out["remote"]["losses"] == out["local"]["losses"], out
            assert out["remote"]["weights"] == out["local"]["weights"], "weights differ from local CPU torch"
            wait_view(address, lambda v: not v.reservations, "no reservation left after the program", timeout=15)
        finally:
            n1.stop()
            n2.stop()


def test_a_pool_quota_of_two_devices_holds_when_a_spanning_program_and_othersrace_placements(tmp_path):
    with EtcdCluster(tmp_path) as etcd:
        address = etcd.address("spanquota")
        n1 = pool_daemon(address, "n1", "--max-sessions", "4")
        n2 = pool_daemon(address, "n2", "--max-sessions", "4")
        try:
            wait_view(address, registered("n1", "n2"), "both daemons")
            done = cli("admin", "--pool", address, "--tenant-quota", "research:devices=2")
            assert done.returncode == 0 and "quota set" in done.stdout, done
            spans = 0
            for _ in range(6):
                # A spanning request and a one-device request at once: whichever transaction wins,
                # the other cannot fit the quota (2 + 1 > 2, 1 + 2 > 2) and the tenant holds at most 2.
                requests = [Request(devices=2, tenant="research", memory=GiB), Request(tenant="research", memory=GiB)]
                won, lost = race_placements(address, requests, timeout_s=2)
                view = pool_view(address)
                assert len(won) == 1 and len(lost) == 1, (won, lost)
                assert view.tenant_usage("research").sessions == won[0][1].devices, view.reservations
                if won[0][1].devices == 2:
                    spans += 1  # (both daemons, one reservation on each, both from the one transaction)
                    assert sorted(r.daemon for r in view.reservations) == sorted(d.id for d in view.daemons)
                assert "of its 2 devices" in lost[0], lost
                for placer, _ in won:
                    placer.release()
                    placer.etcd.close()
                wait_view(address, lambda v: not v.reservations, "the race's reservations gone", timeout=15)
            # A real 2-device program spans the two daemons and holds the tenant's quota; another
            # program of the tenant waits and is refused, saying why.
            holder = spawn_client("hold_two_devices_until_go.py", address, NAME="h", DIR=str(tmp_path), LIBREMOTE_DEVICES="2",
                                  LIBREMOTE_TENANT="research")
            wait_for_file(tmp_path / "h.held", holder, CLIENT_TIMEOUT_S)
            held = json.loads((tmp_path / "h.held").read_text())
            assert sorted(held) == sorted([n1.address, n2.address]), held
            assert pool_view(address).tenant_usage("research").sessions == 2
            assert len({r.daemon for r in pool_view(address).reservations}) == 2
            won, lost = race_placements(address, [Request(tenant="research", memory=GiB) for _ in range(3)], timeout_s=1)
            assert not won and all("holds 2 of its 2 devices" in message for message in lost), lost
            second = spawn_client("hold_two_devices_until_go.py", address, NAME="s", DIR=str(tmp_path), LIBREMOTE_TENANT="research",
                                  LIBREMOTE_DEVICES="1", LIBREMOTE_QUEUE_TIMEOUT="2")
            out, err = finish(second, "the second program did not give up", CLIENT_TIMEOUT_S)
            assert second.returncode != 0 and "holds 2 of its 2 devices across the pool" in err, err[-3000:]
            (tmp_path / "h.go").touch()
            out, err = finish(holder, "the holder did not finish", CLIENT_TIMEOUT_S)
            assert holder.returncode == 0 and last_json(out)["equal"], err[-3000:]
            print(f"spanning placements won {spans} of 6 races")
        finally:
            n1.stop()
            n2.stop()


def test_killing_one_of_the_daemons_a_program_spans_gives_an_error_naming_it(tmp_path):
    with EtcdCluster(tmp_path) as etcd:
        address = etcd.address("spankill")
        n1, n2 = pool_daemon(address, "n1"), pool_daemon(address, "n2")
        try:
            wait_view(address, registered("n1", "n2"), "both daemons")
            pids = {n1.address: n1.process.pid, n2.address: n2.process.pid}
            done = run_python("kill_the_daemon_of_cuda1.py", timeout=CLIENT_TIMEOUT_S, LIBREMOTE_SERVER=address, LIBREMOTE_DEVICES="2",
                              PIDS=json.dumps(pids))
            assert done.returncode == 0, done.stderr[-5000:]
            out = last_json(done.stdout)
            assert out["before"] and out["error"] is not None, out
            other = n1.address if out["second"] == n2.address else n2.address
            assert out["second"] in out["error"] and other not in out["error"], out
            assert out["first_still_works"], out
        finally:
            n1.stop()
            n2.stop()


def test_a_daemon_that_turns_a_placement_away_as_stale_gets_the_client_placed_again(tmp_path):
    with EtcdCluster(tmp_path) as etcd:
        address = etcd.address("stale")
        n1 = pool_daemon(address, "n1", "--loopback-admin")
        n2 = pool_daemon(address, "n2", "--loopback-admin")
        try:
            wait_view(address, registered("n1", "n2"), "both daemons")
            # The reservation lapses between the placement and the HELLO: placed again (anywhere).
            done = run_python("go_stale_before_the_hello.py", timeout=CLIENT_TIMEOUT_S, LIBREMOTE_SERVER=address, MODE="lapse")
            out = last_json(done.stdout)
            assert done.returncode == 0 and out.get("equal"), (out, done.stderr[-3000:])
            assert len(out["calls"]) == 2 and out["calls"][1]["avoid"] == [], out
            print(f"lapsed reservation: placed again and connected in {out['connect_s']:.2f} s")
            # Every placement lapses: bounded retries, then an error saying what happened each time.
            done = run_python("go_stale_before_the_hello.py", timeout=CLIENT_TIMEOUT_S, LIBREMOTE_SERVER=address, MODE="lapse",
                              LAPSE_ALWAYS="1")
            out = last_json(done.stdout)
            assert len(out["calls"]) == 4, out
            assert "placed this program 4 times" in out["error"] and out["error"].count("refused: reservation") == 4, out
            # The daemon drains between the placement and the HELLO: placed again on the other one.
            done = run_python("go_stale_before_the_hello.py", timeout=CLIENT_TIMEOUT_S, LIBREMOTE_SERVER=address, MODE="drain")
            out = last_json(done.stdout)
            assert done.returncode == 0 and out.get("equal"), (out, done.stderr[-3000:])
            first, second = out["calls"]
            assert second["avoid"] == first["daemons"] and second["daemons"] != first["daemons"], out
            assert out["address"] != {f"n1:{n1.port}": n1.address, f"n2:{n2.port}": n2.address}[first["daemons"][0]]
            print(f"daemon drained before the HELLO: placed again and connected in {out['connect_s']:.2f} s "
                  "(including the `libremote admin --drain` subprocess)")
            wait_view(address, lambda v: not v.reservations, "no reservation left", timeout=15)
        finally:
            n1.stop()
            n2.stop()


def test_binpack_keeps_three_devices_on_as_few_daemons_as_fit_and_spread_takes_one_per_daemon(tmp_path):
    with EtcdCluster(tmp_path) as etcd:
        address = etcd.address("three")
        n1 = pool_daemon(address, "n1", device="cpu,cpu")
        n2, n3 = pool_daemon(address, "n2"), pool_daemon(address, "n3")
        try:
            wait_view(address, registered("n1", "n2", "n3"), "three daemons")
            # binpack: n1's two devices (one daemon for as many as it can), then one of the others.
            done = run_python("chain_matmuls_through_every_device.py", timeout=CLIENT_TIMEOUT_S, LIBREMOTE_SERVER=address,
                              LIBREMOTE_DEVICES="3")
            out = last_json(done.stdout)
            assert done.returncode == 0 and out["equal"] and out["count"] == 3, (out, done.stderr[-3000:])
            assert out["sessions"] == 2 and out["addresses"][:2] == [n1.address, n1.address], out
            assert out["addresses"][2] in (n2.address, n3.address), out
            # binpack with two devices: n1 alone (no cross-server copies).
            done = run_python("chain_matmuls_through_every_device.py", timeout=CLIENT_TIMEOUT_S, LIBREMOTE_SERVER=address,
                              LIBREMOTE_DEVICES="2")
            out = last_json(done.stdout)
            assert done.returncode == 0 and out["equal"] and out["addresses"] == [n1.address] * 2, out
            # spread: one device on each daemon.
            done = run_python("chain_matmuls_through_every_device.py", timeout=CLIENT_TIMEOUT_S, LIBREMOTE_SERVER=address,
                              LIBREMOTE_DEVICES="3", LIBREMOTE_PLACEMENT="spread")
            out = last_json(done.stdout)
            assert done.returncode == 0 and out["equal"] and out["sessions"] == 3, (out, done.stderr[-3000:])
            assert sorted(out["addresses"]) == sorted([n1.address, n2.address, n3.address]), out
            # A HELLO whose pinned devices are not the ones its reservation holds is refused.
            done = run_python("hello_with_devices_the_reservation_does_not_hold.py", timeout=CLIENT_TIMEOUT_S, POOL=address)
            out = last_json(done.stdout)
            assert out["refused"] and "asks for devices" in out["refused"] and out["kind"] == "policy", out
            wait_view(address, lambda v: not v.reservations, "no reservation left", timeout=15)
        finally:
            for daemon in (n1, n2, n3):
                daemon.stop()
