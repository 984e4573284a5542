"""One program, devices on two daemons (issue 21, aggregation): ``LIBREMOTE_SERVER=tcp://a,tcp://b``.

cuda:0 is on the first daemon and cuda:1 on the second (libremote/client/servers.py). Tensors move
between them daemon to daemon (EXPORT/PULL, libremote/client/transfer.py and
server/worker/exports.py), and training that spans both gives exactly what local CPU torch gives.
The daemons run on the CPU backend, on loopback, started here; the clients run in subprocesses
(the device guard for two devices is chosen when libremote is imported).
"""

from __future__ import annotations

import pytest

from helpers import last_json, pool_daemon, run_python

CLIENT_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def two_daemons():
    with pool_daemon() as first, pool_daemon() as second:
        yield first, second


def _run(program: str, first, second, **env: str) -> dict:
    """Run ``program`` (tests/programs/) with cuda:0 on ``first`` and cuda:1 on ``second``; its JSON report."""
    result = run_python(program, timeout=CLIENT_TIMEOUT_S, LIBREMOTE_SERVER=f"{first.address},{second.address}", **env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return last_json(result.stdout)


def test_a_cross_server_copy_is_exact_and_goes_daemon_to_daemon(two_daemons):
    first, second = two_daemons
    out = _run("copy_between_two_daemons.py", first, second)
    assert out["count"] == 2 and len(out["names"]) == 2, out
    assert out["addresses"] == [first.address, second.address], out
    assert out["devices"] == ["cuda:1", "cuda:0"] and out["exact"], out
    nbytes = out["nbytes"]
    # The bytes went worker to worker: each daemon's session counted them...
    assert out["exported_by_0"] == nbytes and out["pulled_by_1"] == nbytes, out
    assert out["exported_by_1"] >= nbytes and out["pulled_by_0"] >= nbytes, out
    # ...and the client sent and received only commands, tokens and acknowledgements.
    assert out["client_bytes_during_copies"] < 16 << 10, out
    assert all(out["checks"].values()), out["checks"]
    assert out["sparse_move"] and "cannot move between daemons" in out["sparse_move"], out
    assert out["memory_allocated"][0] >= nbytes and out["memory_allocated"][1] >= nbytes, out
    assert out["facts"] == [[True, True, True], [True, True, True]], out
    assert out["bare_cuda"] == "cuda:1" and out["in_device_0"] == "cuda:0", out


def test_a_data_parallel_step_across_two_daemons_equals_local_cpu(two_daemons):
    out = _run("data_parallel_over_two_daemons.py", *two_daemons)
    assert out["remote"]["losses"] == out["local"]["losses"], out
    assert out["remote"]["weights"] == out["local"]["weights"], "weights differ from local CPU torch"
    assert out["remote"]["weights"][0] == out["remote"]["weights"][1], "the replicas drifted apart"
    # (torch's DataParallel sums the replicas' gradients in another order than one device would)
    assert out["dp_remote"] == pytest.approx(out["dp_local"], rel=1e-5), out


def test_a_pipeline_split_across_two_daemons_equals_local_cpu(two_daemons):
    out = _run("pipeline_over_two_devices.py", *two_daemons)
    assert out["remote"]["grad_devices"] == ["cuda:0", "cuda:1"], out
    assert out["remote"]["losses"] == out["local"]["losses"], out
    assert out["remote"]["weights"] == out["local"]["weights"], "weights differ from local CPU torch"


def test_graph_mode_and_captured_steps_run_on_the_daemon_of_their_inputs(two_daemons):
    out = _run("compile_and_capture_on_the_second_daemon.py", *two_daemons)
    assert out["remote"] == out["local"] and out["compiles"] == 1, out
    assert out["graph_runs"][0] == 0 and out["graph_runs"][1] >= 6, out  # forward and backward, 3 steps
    assert out["captured"] == pytest.approx(out["captured_local"], rel=1e-6), out
    assert out["capture_across"] and "cannot move a tensor between daemons" in out["capture_across"], out


def test_an_op_mixing_devices_of_two_daemons_raises_cudas_error_and_closing_closes_all(two_daemons):
    out = _run("mix_devices_of_two_daemons_then_reconnect.py", *two_daemons)
    for name in ("add", "matmul", "cat", "add_", "where"):
        assert out[name] is not None, (name, out)
        kind, message = out[name]
        assert kind == "RuntimeError", (name, out)
        # what local CUDA says for tensors on two devices
        assert message.startswith("Expected all tensors to be on the same device, but found at least two devices"), (name, message)
        assert "cuda:0" in message and "cuda:1" in message, (name, message)
    assert out["a_still_works"], out
    assert out["all_closed"] and out["reopened"] == [2, 2, 4.0], out
    assert out["old_tensor"] and "earlier session" in out["old_tensor"], out


def test_exports_are_served_once_and_only_with_their_token(two_daemons):
    out = _run("pull_exports_by_hand.py", *two_daemons)
    pulled, total, error = out["wrong_token"][1:]
    assert total == 0 and "no such export" in error, out
    assert "not a piece" in out["too_far"][3], out
    assert out["first"][0] == [12, 0, 40], out  # [PULLED, offset, total], no error
    assert out["first"][1] == list(range(10)), out
    assert "no such export" in out["again"][3], out
    assert out["ipc"] and "tcp://host:port" in out["ipc"], out
    assert out["gone"] and "is gone" in out["gone"][0] and out["gone"][1] < 10, out


def test_exports_are_bounded_expire_and_end_with_their_session(monkeypatch):
    import torch

    from libremote_server.worker import exports as exports_module
    from libremote_wire import messages

    table = exports_module.Exports()
    token, nbytes = table.add("s1", torch.arange(6, dtype=torch.float32).reshape(2, 3).t())
    assert nbytes == 24 and len(token) == messages.EXPORT_TOKEN_BYTES
    total, piece, error = table.serve(token, 0, 24)
    assert error is None and total == 24
    assert torch.frombuffer(bytearray(piece), dtype=torch.float32).tolist() == [0, 3, 1, 4, 2, 5]  # logical order
    other, _ = table.add("s2", torch.ones(3))
    table.drop_session("s2")
    assert table.serve(other, 0, 12)[2] is not None
    monkeypatch.setattr(messages, "MAX_EXPORTS", 2)
    table.add("s3", torch.ones(1))
    table.add("s3", torch.ones(1))
    with pytest.raises(exports_module.ExportRefused, match="at most 2"):
        table.add("s3", torch.ones(1))
    monkeypatch.setattr(messages, "MAX_EXPORT_BYTES", 100)
    with pytest.raises(exports_module.ExportRefused, match="at most 100"):
        table.add("s4", torch.ones(100))
    late, _ = table.add("s4", torch.ones(1))
    monkeypatch.setattr(exports_module.time, "monotonic", lambda: 1e12)
    assert "no such export" in table.serve(late, 0, 4)[2]
    table.expire()
    assert table.held_bytes() == 0
    refusing = exports_module.Exports(allowed=False, why_not="CURVE")
    with pytest.raises(exports_module.ExportRefused, match="CURVE"):
        refusing.add("s", torch.ones(1))


def test_a_killed_daemon_gives_an_error_naming_it():
    with pool_daemon() as first, pool_daemon() as second:
        out = _run("kill_the_second_daemon.py", first, second, SECOND_DAEMON_PID=str(second.process.pid))
    assert out["before"], out
    assert out["error"] is not None, out
    kind, message = out["error"]
    assert second.address in message and first.address not in message, message
    assert out["move_error"] and second.address in out["move_error"], out
    assert out["first_still_works"], out
    assert out["is_connected"] is False, out  # (one of its daemons is gone)


def test_addresses_and_devices_must_agree(two_daemons):
    first, second = two_daemons
    out = _run("use_cuda0_with_more_devices_than_daemons.py", first, second, LIBREMOTE_DEVICES="3")
    assert out["error"] and "LIBREMOTE_DEVICES=3" in out["error"] and "2 daemons" in out["error"], out
    result = run_python("connect_to_two_daemons.py", f"{first.address}, {second.address}", timeout=CLIENT_TIMEOUT_S,
                        LIBREMOTE_DEVICES="2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert last_json(result.stdout) == {"count": 2, "value": [3.0, 3.0]}


def test_entries_can_pin_a_device_of_their_daemon():
    with pool_daemon("--loopback-admin", device="cpu,cpu") as first, \
            pool_daemon("--loopback-admin", device="cpu,cpu") as second:
        servers = f"{first.address}#1,{second.address}#1,{second.address}#0"
        result = run_python("use_pinned_devices_of_two_daemons.py", timeout=CLIENT_TIMEOUT_S, LIBREMOTE_SERVER=servers,
                            FIRST=first.address, SECOND=second.address)
        assert result.returncode == 0, result.stderr[-3000:]
        out = last_json(result.stdout)
        assert out["value"] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0] and out["count"] == 3 and out["sessions"] == 2, out
        assert out["FIRST"] == [[1]] and out["SECOND"] == [[1, 0]], out  # the daemons' own numbers, in order
        refused = run_python("import torch, libremote\ntorch.ones(1, device='cuda:0')", timeout=CLIENT_TIMEOUT_S,
                             LIBREMOTE_SERVER=f"{first.address}#5,{second.address}#0")
        assert refused.returncode != 0 and "device_indices [5]" in refused.stderr and first.address in refused.stderr, \
            refused.stderr[-2000:]


def test_an_unreachable_daemon_is_named_and_the_others_are_closed():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        nobody = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    with pool_daemon("--loopback-admin") as first:
        result = run_python("connect_with_one_daemon_unreachable.py", timeout=CLIENT_TIMEOUT_S,
                            LIBREMOTE_SERVER=f"{first.address},{nobody}", LIBREMOTE_TIMEOUT="2", FIRST=first.address)
        assert result.returncode == 0, result.stderr[-3000:]
        out = last_json(result.stdout)
        assert out["error"] and nobody in out["error"] and "one of the 2 daemons" in out["error"], out
        assert out["left_open"] == [], out


def test_an_unmodified_pipeline_script_runs_across_two_daemons(two_daemons):
    """examples/pipeline_two_servers.py has no libremote in it: LIBREMOTE_SERVER opts it in."""
    from helpers import REPO, run_python

    first, second = two_daemons
    script = str(REPO / "examples" / "pipeline_two_servers.py")
    remote = run_python(script, timeout=CLIENT_TIMEOUT_S, LIBREMOTE_SERVER=f"{first.address},{second.address}")
    local = run_python(script, timeout=CLIENT_TIMEOUT_S)
    assert remote.returncode == 0 and local.returncode == 0, remote.stderr[-3000:] + local.stderr[-3000:]
    assert remote.stdout.startswith("stage 1 on libremote"), remote.stdout
    losses = [line for line in remote.stdout.splitlines() if line.startswith("step")]
    assert len(losses) == 5 and losses == [line for line in local.stdout.splitlines() if line.startswith("step")]
