"""Memory oversubscription (issue 5): sessions hold more than the device budget; the daemon spills
the least valuable storages to host RAM and restores them before anything touches them.

Every test runs real daemons (``--device cpu --device-memory SIZE --host-spill SIZE``) and real
client processes; clients compute the same thing with plain local torch and compare. Values are
chosen so that every compared result is exact whatever the summation order (small integers in
float32), so ``torch.equal`` is the comparison even for matmuls and reductions. Clients and the
test synchronise through files, never sleeps; subprocess timeouts only prove "no hang".
"""

from __future__ import annotations

import json
import re

import pytest

from helpers import (
    cli,
    finish,
    kill_all,
    last_json,
    pool_daemon,
    run_python,
    session_of,
    spawn_client,
    spawn_holder,
    status,
    wait_for_file,
    wait_status,
)

MiB = 1 << 20
#: Generous bound for one client process ("it did not hang"); spilling on a 2-core CPU is slow.
TIMEOUT_S = 300.0


def run_client(program: str, address: str, **env: str) -> dict:
    result = run_python(program, timeout=TIMEOUT_S, LIBREMOTE_SERVER=address, **env)
    assert result.returncode == 0, f"client failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return last_json(result.stdout)


def residency(report: dict) -> dict:
    device = report["devices"][0]
    assert "residency" in device, f"status has no residency for the device: {json.dumps(device, indent=2)}"
    return device["residency"]


# ------------------------------------------------------------------------------------------------
# 1. One client, working set 4x the device budget: exact results, and the figures show spilling
# ------------------------------------------------------------------------------------------------
def test_working_set_four_times_the_budget_gives_exact_results():
    with pool_daemon("--device-memory", "16MiB", "--host-spill", "512MiB") as server:
        out = run_client("spill_chain_of_ops.py", server.address)
        report = status(server.address)
    assert out["problems"] == [], out["problems"]
    budget = 16 * MiB
    assert out["after_upload"]["allocated"] == 64 * MiB, out["after_upload"]
    assert out["after_upload"]["resident"] <= budget, out["after_upload"]
    assert out["after_upload"]["spilled"] >= 48 * MiB, out["after_upload"]
    for where, session_resident, device_resident in out["resident_samples"]:
        assert session_resident <= budget and device_resident <= budget, (where, session_resident, device_resident)
    final = out["final"]
    assert final["allocated"] == out["virtual_total"] == 64 * MiB, final
    assert out["torch_cuda_allocated"] == 64 * MiB, out
    assert final["spilled"] > 0, final
    assert final["resident"] <= budget, final
    assert final["resident"] + final["spilled"] == final["allocated"], final
    device = final["device"]
    assert device["resident_bytes"] <= budget, device
    assert device["evictions"] > 0 and device["restores"] > 0, device
    assert device["bytes_evicted"] > 0 and device["bytes_restored"] > 0, device
    assert device["spilled_bytes"] == final["spilled"], device  # the only session on the device
    # The client is gone: the daemon released everything it held, resident and spilled.
    assert residency(report)["resident_bytes"] == 0 and residency(report)["spilled_bytes"] == 0, report
    assert residency(report)["evictions"] >= device["evictions"], report


# ------------------------------------------------------------------------------------------------
# 2. Views and in-place writes across eviction and restore
# ------------------------------------------------------------------------------------------------
def test_views_and_in_place_writes_survive_eviction_and_restore():
    with pool_daemon("--device-memory", "16MiB", "--host-spill", "512MiB") as server:
        out = run_client("spill_views_and_in_place_writes.py", server.address)
    assert out["problems"] == [], out["problems"]
    # Before every step base (4 MiB, the session's only storage then) really was in host RAM.
    for label, (spilled, allocated) in out["spilled_before"].items():
        assert allocated == 4 * MiB and spilled == 4 * MiB, (label, spilled, allocated)
    assert out["restored_by_reading"] >= 1, out
    assert out["spilled_after_read"] == 0, out
    assert out["final"]["device"]["evictions"] > 0 and out["final"]["device"]["restores"] > 0, out["final"]


# ------------------------------------------------------------------------------------------------
# 3. Training when parameters and optimizer state do not fit
# ------------------------------------------------------------------------------------------------
def test_training_with_parameters_and_optimizer_state_over_the_budget():
    with pool_daemon("--device-memory", "16MiB", "--host-spill", "512MiB") as server:
        out = run_client("spill_training_over_the_budget.py", server.address)
    assert len(out["remote"]) == 4 and out["remote"] != [out["remote"][0]] * 4, out  # it trained
    for step in out["stats"]:
        assert step["allocated"] > 48 * MiB, step       # weights, grads and Adam state: > 3x budget
        assert step["resident"] <= 16 * MiB, step
        assert step["device"]["resident_bytes"] <= 16 * MiB, step
        assert step["spilled"] > 0, step
    last = out["stats"][-1]["device"]
    assert last["evictions"] > 0 and last["restores"] > 0, last


# ------------------------------------------------------------------------------------------------
# 4. Several clients at once, together 3x the budget
# ------------------------------------------------------------------------------------------------
def test_concurrent_clients_three_times_the_budget_get_exact_results(tmp_path):
    with pool_daemon("--device-memory", "16MiB", "--host-spill", "512MiB") as server:
        names = {"a": 11, "b": 22, "c": 33}
        clients = {name: spawn_client("spill_concurrent_work.py", server.address, NAME=name, DIR=str(tmp_path), SEED=str(seed))
                   for name, seed in names.items()}
        try:
            for name, client in clients.items():
                wait_for_file(tmp_path / f"{name}.in", client, timeout=TIMEOUT_S)
            report = status(server.address)
            assert len(report["sessions"]) == 3, report
            assert sum(row["memory_allocated"] for row in report["sessions"]) >= 48 * MiB, report
            (tmp_path / "go").touch()
            for name, client in clients.items():
                wait_for_file(tmp_path / f"{name}.done", client, timeout=TIMEOUT_S)
            report = status(server.address)
            table = cli("status", "--server", server.address).stdout
            (tmp_path / "exit").touch()
            results = {}
            for name, client in clients.items():
                out, err = finish(client, f"client {name} hung", timeout=TIMEOUT_S)
                assert server.process.poll() is None, f"the daemon died (exit status {server.process.poll()})"
                assert client.returncode == 0, f"client {name}:\n{out}\n{err}"
                results[name] = last_json(out)
        finally:
            kill_all(list(clients.values()))
        assert {name: r["result"] for name, r in results.items()} == {"a": "OK", "b": "OK", "c": "OK"}, \
            {name: r["problems"] for name, r in results.items()}
        held = residency(report)
        assert held["evictions"] > 0 and held["restores"] > 0, held
        assert held["resident_bytes"] <= 16 * MiB, held
        assert held["spilled_bytes"] >= 32 * MiB, held    # at least 48 MiB held, at most 16 resident
        assert sum(row["memory_spilled"] for row in report["sessions"]) == held["spilled_bytes"], report
        size = r"[\d.]+ (?:B|KiB|MiB|GiB)"
        assert re.search(rf"dev 0: {size} resident \(budget 16\.0 MiB\), {size} spilled to host \(limit 512\.0 MiB\); "
                         rf"since start {size} spilled, {size} restored \({size} prefetched ahead of use\), "
                         rf"{size} freed data dropped without a copy", table), table
        assert "Traceback" not in server.log()


# ------------------------------------------------------------------------------------------------
# 5. Both budgets exhausted: out-of-memory, recovery, and a neighbour unaffected
# ------------------------------------------------------------------------------------------------
def test_exhausted_device_and_host_raise_out_of_memory_and_recover(tmp_path):
    with pool_daemon("--device-memory", "8MiB", "--host-spill", "16MiB") as server:
        # The neighbour asks for high priority (allowed without a tenants file), so the
        # exhausting client's own storages are spilled before the neighbour's megabyte.
        neighbour = spawn_client("spill_neighbour.py", server.address, DIR=str(tmp_path), LIBREMOTE_PRIORITY="high")
        hog = None
        try:
            def neighbour_phase(phase: str) -> str:
                (tmp_path / f"B.go.{phase}").touch()
                wait_for_file(tmp_path / f"B.{phase}", neighbour, timeout=TIMEOUT_S)
                return (tmp_path / f"B.{phase}").read_text()

            assert neighbour_phase("before") == "OK"
            hog = spawn_client("spill_exhaust_both_budgets.py", server.address, DIR=str(tmp_path))
            wait_for_file(tmp_path / "A.failed", hog, timeout=TIMEOUT_S)
            report_during = status(server.address)
            assert neighbour_phase("during") == "OK"
            (tmp_path / "A.go").touch()
            out, err = finish(hog, "the exhausting client hung", timeout=TIMEOUT_S)
            assert hog.returncode == 0, f"{out}\n{err}"
            assert neighbour_phase("after") == "OK"
            out_n, err_n = finish(neighbour, "the neighbour hung", timeout=TIMEOUT_S)
            assert neighbour.returncode == 0, err_n
        finally:
            kill_all([c for c in (neighbour, hog) if c is not None])
    result = last_json(out)
    assert result["after_five"]["allocated"] == 20 * MiB, result["after_five"]
    assert result["alloc_line_raised"] is False, result
    assert result["sync_raised"] == "RemoteOutOfMemoryError", result
    assert result["is_torch_oom"], result
    message = result["message"]
    for word in ("resident", "spilled", "8.00 MiB", "16.00 MiB"):
        assert word in message, (word, message)
    assert result["allocated_after_failure"] == 20 * MiB, result   # the refused tensors hold nothing
    assert result["stats_after_failure"]["device"]["spilled_bytes"] <= 16 * MiB, result
    assert result["stats_after_failure"]["device"]["resident_bytes"] <= 8 * MiB, result
    assert result["allocated_after_free"] == 8 * MiB, result
    four = 1024 * 1024
    assert result["sums"] == [4.0 * four, 5.0 * four, 10.0 * four], result
    assert result["values_ok"] is True, result
    assert result["final"]["allocated"] == 12 * MiB, result
    during = residency(report_during)
    assert during["spilled_bytes"] <= 16 * MiB and during["resident_bytes"] <= 8 * MiB, during


# ------------------------------------------------------------------------------------------------
# 6. Eviction follows priority: a low-priority tenant is spilled before a high-priority one
# ------------------------------------------------------------------------------------------------
PRIORITY_TENANTS = """
[tenants.low]
token = "low-secret"
priority = "low"

[tenants.high]
token = "high-secret"
priority = "high"
"""


def test_low_priority_sessions_are_spilled_before_high_priority_ones(tmp_path):
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(PRIORITY_TENANTS)
    with pool_daemon("--tenants", str(tenants), "--device-memory", "16MiB", "--host-spill", "256MiB",
                     "--loopback-admin") as server:  # (the test reads the whole pool's status)
        # low holds 3 x 4 MiB, high 1 x 3.5 MiB: 15.5 of 16 MiB, nothing spilled. Then high adds
        # 2 x 3.5 MiB: 6.5 MiB (two of low's storages) must go, and low has 12 MiB to give, so high
        # keeps all of its own. When low then reads its data one storage at a time, the room it
        # needs comes from its own other storages again (one of them is resident), not from high's.
        low = spawn_client("spill_by_priority.py", server.address, NAME="low", DIR=str(tmp_path), COUNT="3", FIRST="3",
                           ELEMENTS=str(1024 * 1024), LIBREMOTE_TENANT="low", LIBREMOTE_TOKEN="low-secret")
        high = spawn_client("spill_by_priority.py", server.address, NAME="high", DIR=str(tmp_path), COUNT="3", FIRST="1",
                            ELEMENTS=str(896 * 1024), LIBREMOTE_TENANT="high", LIBREMOTE_TOKEN="high-secret",
                            LIBREMOTE_PRIORITY="high")
        clients = [low, high]

        def step(name: str, what: str) -> dict:
            client = low if name == "low" else high
            (tmp_path / f"{name}.{what}").touch()
            wait_for_file(tmp_path / f"{name}.{what}.json", client, timeout=TIMEOUT_S)
            return json.loads((tmp_path / f"{name}.{what}.json").read_text())

        try:
            step("low", "alloc1")
            step("low", "alloc2")                          # low has nothing more to add
            step("high", "alloc1")
            report = status(server.address)
            rows = {name: session_of(report, client.pid) for name, client in (("low", low), ("high", high))}
            assert (rows["low"]["priority"], rows["high"]["priority"]) == ("low", "high"), rows
            assert rows["low"]["memory_spilled"] == 0 and rows["high"]["memory_spilled"] == 0, rows
            assert residency(report)["resident_bytes"] == 15.5 * MiB, report

            step("high", "alloc2")                         # pressure from the high session
            report = status(server.address)
            rows = {name: session_of(report, client.pid) for name, client in (("low", low), ("high", high))}
            assert rows["high"]["memory_allocated"] == 10.5 * MiB, rows
            assert rows["low"]["memory_spilled"] == 8 * MiB, rows
            assert rows["high"]["memory_spilled"] == 0, rows

            low_read = step("low", "read")                 # pressure from the low session itself
            assert low_read["ok"] is True, low_read
            report = status(server.address)
            rows = {name: session_of(report, client.pid) for name, client in (("low", low), ("high", high))}
            assert rows["high"]["memory_spilled"] == 0, rows  # low spilled its own storages to read them
            assert rows["low"]["memory_spilled"] == 8 * MiB, rows

            high_read = step("high", "read")
            assert high_read["ok"] is True, high_read
            assert high_read["stats"]["spilled"] == 0, high_read
            for name in ("low", "high"):
                (tmp_path / f"{name}.exit").touch()
            for client in clients:
                out, err = finish(client, "a priority client hung", timeout=TIMEOUT_S)
                assert client.returncode == 0, f"{out}\n{err}"
                assert last_json(out)["ok"] is True
        finally:
            kill_all(clients)


# ------------------------------------------------------------------------------------------------
# 7. --oversubscribe: admission by the sum of quotas
# ------------------------------------------------------------------------------------------------
OVERSUBSCRIBE_FLAGS = ("--device-memory", "64MiB", "--memory-quota", "48MiB", "--host-spill", "256MiB")


def test_oversubscribe_ratio_one_queues_the_second_client(tmp_path):
    with pool_daemon("--oversubscribe", "1.0", *OVERSUBSCRIBE_FLAGS) as server:
        a = spawn_holder(server.address, tmp_path, "A")
        clients = [a]
        try:
            wait_for_file(tmp_path / "A.in", a, timeout=TIMEOUT_S)
            b = spawn_holder(server.address, tmp_path, "B")   # 48 + 48 MiB > 1.0 x 64 MiB
            clients.append(b)
            report = wait_status(server.address, lambda r: len(r["waiting"]) == 1, "B waiting", clients=clients)
            assert [row["pid"] for row in report["sessions"]] == [a.pid], report
            assert report["waiting"][0]["pid"] == b.pid, report
            assert report["sessions"][0]["memory_quota"] == 48 * MiB, report
            assert not (tmp_path / "B.in").exists()

            (tmp_path / "A.go").touch()
            out, err = finish(a, "A hung", timeout=TIMEOUT_S)
            assert a.returncode == 0, err
            assert last_json(out)["total"] == 6144.0
            wait_for_file(tmp_path / "B.in", b, timeout=TIMEOUT_S)   # admitted once A left
            report = status(server.address)
            assert [row["pid"] for row in report["sessions"]] == [b.pid] and report["waiting"] == [], report
            (tmp_path / "B.go").touch()
            out, err = finish(b, "B hung", timeout=TIMEOUT_S)
            assert b.returncode == 0, err
            assert last_json(out)["admitted"] is True and last_json(out)["total"] == 6144.0
        finally:
            kill_all(clients)


def test_oversubscribe_ratio_two_admits_both(tmp_path):
    with pool_daemon("--oversubscribe", "2.0", *OVERSUBSCRIBE_FLAGS) as server:
        a = spawn_holder(server.address, tmp_path, "A")
        b = spawn_holder(server.address, tmp_path, "B")     # 96 MiB <= 2.0 x 64 MiB
        clients = [a, b]
        try:
            wait_for_file(tmp_path / "A.in", a, timeout=TIMEOUT_S)
            wait_for_file(tmp_path / "B.in", b, timeout=TIMEOUT_S)
            report = status(server.address)
            assert sorted(row["pid"] for row in report["sessions"]) == sorted([a.pid, b.pid]), report
            assert report["waiting"] == [], report
            for name, client in (("A", a), ("B", b)):
                (tmp_path / f"{name}.go").touch()
                out, err = finish(client, f"{name} hung", timeout=TIMEOUT_S)
                assert client.returncode == 0, err
                assert last_json(out)["total"] == 6144.0
        finally:
            kill_all(clients)


# ------------------------------------------------------------------------------------------------
# 8. Fetching and uploading into a spilled tensor
# ------------------------------------------------------------------------------------------------
def test_fetch_and_upload_of_spilled_tensors_are_exact():
    with pool_daemon("--device-memory", "16MiB", "--host-spill", "512MiB") as server:
        out = run_client("spill_fetch_and_upload.py", server.address)
    assert out["problems"] == [], out["problems"]
    for label, (spilled, allocated) in out["spilled"].items():
        assert allocated == 4 * MiB and spilled == 4 * MiB, (label, spilled, allocated)  # x was in host RAM
    assert out["final"]["device"]["restores"] >= len(out["spilled"]), out["final"]


def test_fetch_is_exact_while_another_client_forces_eviction(tmp_path):
    """A FETCH reply's bytes must stay valid until they are sent, even when another session's
    op evicts (frees) that storage right after the fetch ran."""
    with pool_daemon("--device-memory", "16MiB", "--host-spill", "512MiB") as server:
        fetcher = spawn_client("spill_fetch_loop.py", server.address, DIR=str(tmp_path))
        pressure = spawn_client("spill_pressure_loop.py", server.address, DIR=str(tmp_path))
        clients = [fetcher, pressure]
        try:
            wait_for_file(tmp_path / "fetcher.in", fetcher, timeout=TIMEOUT_S)
            wait_for_file(tmp_path / "pressure.in", pressure, timeout=TIMEOUT_S)
            (tmp_path / "go").touch()
            out_f, err_f = finish(fetcher, "the fetching client hung", timeout=TIMEOUT_S)
            (tmp_path / "stop").touch()
            out_p, err_p = finish(pressure, "the pressure client hung", timeout=TIMEOUT_S)
        finally:
            kill_all(clients)
        assert server.process.poll() is None, f"the daemon died (exit status {server.process.poll()}):\n{server.log()}"
        assert fetcher.returncode == 0, err_f
        assert pressure.returncode == 0, err_p
        report = status(server.address)
    assert last_json(out_p)["bad"] == 0, out_p
    assert residency(report)["evictions"] > 0, report
    assert last_json(out_f)["wrong"] == [], f"fetches that returned wrong bytes: {last_json(out_f)['wrong']}"


# ------------------------------------------------------------------------------------------------
# An op whose own operands exceed the budget still runs: they stay resident together
# ------------------------------------------------------------------------------------------------
def test_an_op_larger_than_the_budget_runs_with_its_operands_resident():
    with pool_daemon("--device-memory", "8MiB", "--host-spill", "512MiB") as server:
        out = run_client("spill_an_op_larger_than_the_budget.py", server.address)
    assert out["exact"] and out["sum_close"], out


# ------------------------------------------------------------------------------------------------
# Eviction looks ahead: what a queued op is about to use is not the one spilled
# ------------------------------------------------------------------------------------------------
def test_eviction_spares_what_queued_ops_are_about_to_use():
    with pool_daemon("--device-memory", "12MiB", "--host-spill", "512MiB") as server:
        out = run_client("spill_what_the_queue_does_not_need.py", server.address)
    assert out["value"] == 4.0 * (1 << 20), out
    assert out["evictions"] >= 1, out
    assert out["restores"] == 0, out


def test_of_what_queued_ops_need_the_one_needed_last_is_spilled_first():
    """Belady's rule over the queue: when everything resident is about to be used, the tensor
    used last goes. Least-recent-use alone would spill c, bring it back and cascade (4 restores)."""
    with pool_daemon("--device-memory", "13MiB", "--host-spill", "512MiB") as server:
        out = run_client("spill_the_one_needed_last.py", server.address)
    assert out["sums"] == [2.0 * (1 << 20), 3.0 * (1 << 20), 1.0 * (1 << 20), 4.0 * (1 << 20)], out
    assert out["restores"] == 1, out  # a, spilled for b, comes back once; c and d never left


def test_what_queued_ops_will_need_is_prefetched_into_free_room():
    """Between slices the daemon restores, ahead of use, what the queued commands will read, when
    there is room for it: the op that reads it then finds it resident (no restore on demand)."""
    with pool_daemon("--device-memory", "13MiB", "--host-spill", "512MiB") as server:
        out = run_client("spill_prefetch_into_free_room.py", server.address, LIBREMOTE_BATCH="1024")
    assert out["total"] == 5.0 * (1 << 20) + 4 * 200, out
    assert out["spilled_a"] == 4 * MiB, out
    assert out["prefetches"] == 1 and out["bytes_prefetched"] == 4 * MiB, out
    assert out["restores"] == 1, out  # the prefetch was its only restore: none on demand


def test_an_idle_sessions_storages_make_room_for_a_busy_ones_prefetch(tmp_path):
    """A session with no queued work gives way to one whose queue needs its spilled data: the
    prefetch spills the idle session's storages, so the busy one never waits on a restore."""
    with pool_daemon("--device-memory", "13MiB", "--host-spill", "512MiB") as server:
        busy = spawn_client("spill_prefetching_session.py", server.address, DIR=str(tmp_path), LIBREMOTE_BATCH="1024")
        clients = [busy]
        try:
            wait_for_file(tmp_path / "A.in", busy, timeout=TIMEOUT_S)
            idle = spawn_client("spill_idle_session.py", server.address, DIR=str(tmp_path))
            clients.append(idle)
            wait_for_file(tmp_path / "B.in", idle, timeout=TIMEOUT_S)
            (tmp_path / "A.go").touch()
            out, err = finish(busy, "the busy client hung", timeout=TIMEOUT_S)
            assert busy.returncode == 0, err
            result = last_json(out)
            (tmp_path / "B.exit").touch()
            out, err = finish(idle, "the idle client hung", timeout=TIMEOUT_S)
            assert idle.returncode == 0, err        # its tensors came back intact
        finally:
            kill_all(clients)
    assert result["total"] == 5.0 * MiB + 4 * 200, result
    assert result["spilled_a"] == 4 * MiB, result
    assert result["prefetches"] == 1 and result["restores"] == 1, result


def test_a_session_waiting_for_its_turn_is_prefetched_for_before_it_runs(tmp_path):
    """A session whose data was spilled while it was idle sends work while another session is
    busy: when its turn comes, its slice starts with a prefetch of what its queued ops read (on
    a GPU, a side-stream copy overlapping the kernels the busy session queued), not with a
    restore on demand in front of its first op."""
    with pool_daemon("--device-memory", "13MiB", "--host-spill", "512MiB") as server:
        waiting = spawn_client("spill_waiting_session.py", server.address, DIR=str(tmp_path))
        clients = [waiting]
        try:
            wait_for_file(tmp_path / "W.in", waiting, timeout=TIMEOUT_S)
            running = spawn_client("spill_running_session.py", server.address, DIR=str(tmp_path), LIBREMOTE_BATCH="1024")
            clients.append(running)
            out, err = finish(waiting, "the waiting client hung", timeout=TIMEOUT_S)
            assert waiting.returncode == 0, err
            result = last_json(out)
            _, err = finish(running, "the running client hung", timeout=TIMEOUT_S)
            assert running.returncode == 0, err
        finally:
            kill_all(clients)
    assert result["total"] == 5.0 * MiB, result
    assert result["spilled_a"] == 4 * MiB, result
    assert result["prefetches"] == 1 and result["restores"] == 1, result


def test_a_gpu_without_a_set_budget_keeps_headroom_for_the_cuda_context():
    from libremote_server.broker import default_budget

    GiB = 1 << 30
    assert default_budget("cpu", 64 * GiB) == 64 * GiB  # the CPU backend: all of it
    assert default_budget("cuda:0", 80 * GiB) == 80 * GiB - int(80 * GiB * 0.06)
    assert default_budget("cuda:0", 16 * GiB) == 14 * GiB  # at least 2 GiB headroom
    assert default_budget("cuda:0", 3 * GiB) == 3 * GiB // 2  # never below half


# ------------------------------------------------------------------------------------------------
# An optimizer step larger than the device budget runs in slices that fit
# ------------------------------------------------------------------------------------------------
def test_a_foreach_step_larger_than_the_budget_runs_in_slices_that_fit():
    """Adam's foreach ops name every parameter and state tensor at once: 32 MiB of operands
    against a 16 MiB budget. Whole, the op would need them all resident together (more than the
    device holds); split into slices of indices, nothing is ever resident above the budget, and
    the results equal local torch's bit for bit."""
    with pool_daemon("--device-memory", "16MiB", "--host-spill", "512MiB") as server:
        out = run_client("spill_foreach_adam_step.py", server.address)
    assert all(out["equal"]), out
    assert out["evictions"] > 0, out
    assert 0 < out["peak"] <= out["budget"], out


def test_a_captured_step_whose_output_was_spilled_replays_exactly():
    """A captured step writes its results into the same tensors every replay; one of them was
    spilled to host RAM in between (other tensors took the device), so it comes back first."""
    with pool_daemon("--device-memory", "8MiB", "--host-spill", "256MiB") as server:
        out = run_client("spill_captured_step_outputs.py", server.address)
    assert all(out["results"]), out
    assert any(out["spilled"]) and out["restores"] > 0, out


@pytest.mark.parametrize("set_to_none", [False, True], ids=["grads-kept", "grads-made-each-step"])
def test_captured_training_steps_through_spills_match_an_unconstrained_daemon(set_to_none):
    """Replays of a whole training step (forward, backward, capturable Adam) whose memory is twice
    the device budget: results spilled during a replay are brought back before the replay copies
    them into the step's outputs (it used to read a spilled storage and crash the daemon), and
    losses and parameters are bit-identical to the same program on a daemon with no budget. With
    ``set_to_none=True`` every replay makes the gradients anew: the last replay's gradients stay
    tracked (and may be spilled) until the new ones are copied into them."""
    with pool_daemon() as server:
        free = run_client("spill_captured_training.py", server.address, SET_TO_NONE=str(set_to_none))
    for factor in ((2.0,) if set_to_none else (1.5, 2.0)):  # (one factor is enough for the variant)
        budget = str(int(free["allocated"] / factor))
        with pool_daemon("--device-memory", budget, "--host-spill", "512MiB") as server:
            tight = run_client("spill_captured_training.py", server.address, SET_TO_NONE=str(set_to_none))
            assert "Traceback" not in server.log() and server.process.poll() is None, server.log()
        assert tight["evictions"] > 0, tight
        assert (tight["losses"], tight["params"]) == (free["losses"], free["params"]), factor
    assert free["losses"][1] < free["losses"][0], free   # it trains


def test_storages_freed_before_any_use_are_dropped_not_spilled():
    """Making room, the daemon first takes storages that queued commands free before anything
    reads them: their bytes are dropped with no copy to host RAM. A storage a live view still
    uses is not dead, and neither is one whose only other handle is a tensor moved onto it
    with ``set_`` (its handle count follows the move)."""
    with pool_daemon("--device-memory", "13MiB", "--host-spill", "512MiB") as server:
        out = run_client("spill_dead_storages.py", server.address, LIBREMOTE_BATCH="1024")
        assert server.process.poll() is None, server.log()
    assert out["total"] == (2.0 + 3.0 + 4.0) * MiB, out
    assert out["dead"] == {"discards": 1, "bytes_discarded": 4 * MiB, "evictions": 0}, out
    assert out["alive"] == 5.0 * MiB + 2.0 * 16 + 6.0 * MiB + 7.0 * MiB + 4 * 100, out
    # Room for e came from spilling (y's storage and b's are live); what was dropped, if anything,
    # is a small temporary of the loop that the client had freed.
    assert out["evictions_after"] > 0 and out["bytes_discarded_after"] < MiB, out
