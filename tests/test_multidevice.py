"""A client using several of the pool's devices (LIBREMOTE_DEVICES=2 on a two-device daemon).

Runs in subprocesses: the device guard that makes autograd work on remote:1 is chosen when
libremote is imported, from LIBREMOTE_DEVICES (see libremote/client/device_guard.py).
"""

from __future__ import annotations

import pytest

from helpers import last_json, pool_daemon, run_python


def test_a_client_trains_on_two_devices_of_the_pool():
    with pool_daemon(device="cpu,cpu") as server:
        result = run_python("train_on_two_devices.py", timeout=600, LIBREMOTE_SERVER=server.address, LIBREMOTE_DEVICES="2")
        assert result.returncode == 0, result.stderr
        out = last_json(result.stdout)
    assert out["count"] == 2 and out["welcome_devices"] == 2, out
    for device in ("cuda:0", "cuda:1"):
        assert out[device]["param_device"] == device and out[device]["grad_device"] == device, out
        assert out[device]["losses"] == out["cpu"]["losses"], (device, out)
    parallel = out["data_parallel"]
    assert parallel["out_device"] == "cuda:0" and parallel["grad_device"] == "cuda:0", out
    assert parallel["losses"] == pytest.approx(out["cpu"]["losses"], rel=1e-5), out
    assert out["copied_equal"] and out["copy_between_devices"], out
    assert out["where_device"] == "cuda:1" and out["where_values"], out
    assert "same device" in out["mismatch"] and "cuda:1" in out["mismatch"] and "cuda:0" in out["mismatch"], out
    assert out["bare_cuda"] == "cuda:1", out


def test_asking_for_more_devices_than_the_pool_has_is_refused():
    with pool_daemon(device="cpu,cpu") as server:
        result = run_python("connect_and_report_the_error.py", timeout=600, LIBREMOTE_SERVER=server.address,
                            LIBREMOTE_DEVICES="3")
    assert result.returncode == 0, result.stderr
    error = last_json(result.stdout)["error"]
    assert error and "LIBREMOTE_DEVICES" in error and "at most 2" in error, error
