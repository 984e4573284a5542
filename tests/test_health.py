"""Device health (issue 22): NVML's figures become metrics and status, an unhealthy device (ECC,
XID, temperature, lost) takes no new sessions and says why, and a daemon without NVML reports what
the host can and "not available" for the rest, never a crash.

NVML itself needs a GPU: here a stand-in module with nvidia-ml-py's API drives the sampler (the
GPU machine runs the real one), and a CPU daemon is made unhealthy through ``--health-inject``
(tests only), with everything downstream real: admission, status, /readyz, /metrics.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import types

import pytest

from helpers import run_python
from ops_support import MetricsDaemon, cli, release, spawn_holder, value, wait_holding


class NVMLError(Exception):
    pass


def fake_nvml(**overrides):
    """A stand-in for ``pynvml`` (nvidia-ml-py) with one GPU whose figures ``overrides`` change."""
    figures = {"temperature": 61, "slowdown": 92, "fan": 40, "power": 312_500, "limit": 700_000, "sm": 1980,
               "mem": 2619, "gpu_util": 87, "mem_util": 35, "used": 30 << 30, "total": 80 << 30, "ecc_corrected": 3,
               "ecc_uncorrected": 0, "energy": 12_345_000, "throttle": 0x4, "lost": False, "xids": []}
    figures.update(overrides)
    module = types.SimpleNamespace(
        NVML_TEMPERATURE_GPU=0, NVML_TEMPERATURE_THRESHOLD_SLOWDOWN=1, NVML_CLOCK_SM=1, NVML_CLOCK_MEM=2,
        NVML_MEMORY_ERROR_TYPE_CORRECTED=0, NVML_MEMORY_ERROR_TYPE_UNCORRECTED=1, NVML_VOLATILE_ECC=0,
        nvmlEventTypeXidCriticalError=8, figures=figures, calls=[])
    handle = object()

    def check() -> None:
        if figures["lost"]:
            raise NVMLError("GPU is lost")

    def not_supported(*_):
        raise NVMLError("Not Supported")

    module.nvmlInit = lambda: None
    module.nvmlShutdown = lambda: None
    module.nvmlDeviceGetHandleByUUID = lambda uuid: handle if uuid == "GPU-1234" else not_supported()
    module.nvmlDeviceGetHandleByIndex = lambda index: handle
    module.nvmlDeviceGetTemperature = lambda h, kind: check() or figures["temperature"]
    module.nvmlDeviceGetTemperatureThreshold = lambda h, kind: figures["slowdown"]
    module.nvmlDeviceGetFanSpeed = lambda h: not_supported() if figures["fan"] is None else figures["fan"]
    module.nvmlDeviceGetPowerUsage = lambda h: figures["power"]
    module.nvmlDeviceGetEnforcedPowerLimit = lambda h: figures["limit"]
    module.nvmlDeviceGetClockInfo = lambda h, clock: figures["sm"] if clock == 1 else figures["mem"]
    module.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=figures["gpu_util"], memory=figures["mem_util"])
    module.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=figures["used"], total=figures["total"])
    module.nvmlDeviceGetTotalEccErrors = lambda h, kind, counter: figures["ecc_corrected" if kind == 0 else "ecc_uncorrected"]
    module.nvmlDeviceGetTotalEnergyConsumption = lambda h: figures["energy"]
    module.nvmlDeviceGetCurrentClocksEventReasons = lambda h: figures["throttle"]
    module.nvmlDeviceGetRemappedRows = lambda h: (0, 0, False, False)
    events = threading.Event()

    def wait(event_set, timeout_ms):
        if figures["xids"]:
            return types.SimpleNamespace(device=handle, eventData=figures["xids"].pop(0))
        events.wait(timeout_ms / 1000)
        raise NVMLError("Timeout")

    module.nvmlEventSetCreate = lambda: object()
    module.nvmlDeviceRegisterEvents = lambda h, kinds, event_set: None
    module.nvmlEventSetWait = wait
    module.nvmlEventSetFree = lambda event_set: None
    return module


def wait_sample(sampler, predicate, timeout=10.0):
    """Sample until ``predicate(device 0's row)`` holds (XID events arrive from their own thread)."""
    deadline = time.monotonic() + timeout
    while True:
        row = sampler.sample()["devices"][0]
        if predicate(row) or time.monotonic() > deadline:
            return row
        time.sleep(0.05)


def sampler_with(nvml, **kwargs):
    from libremote_server.telemetry.health import DeviceRef, HealthSampler

    return HealthSampler([DeviceRef(0, "cuda:0", "GPU-1234")], nvml=nvml, interval_s=0, **kwargs)


def test_nvml_figures_become_status_and_metrics():
    from libremote_server.telemetry import metrics

    sampler = sampler_with(fake_nvml(fan=None))
    sampler.start()
    row = sampler.sample()["devices"][0]
    assert row["healthy"] and row["source"] == "nvml" and row["uuid"] == "GPU-1234"
    assert row["temperature_c"] == 61 and row["temperature_limit_c"] == 87  # (slowdown 92 less 5)
    assert row["power_w"] == 312.5 and row["power_limit_w"] == 700 and row["sm_clock_hz"] == 1.98e9
    assert row["utilization"] == 0.87 and row["ecc_corrected"] == 3 and row["throttle_reasons"] == ["sw_power_cap"]
    assert row["fan_ratio"] is None and row["unavailable"] == ["fan_ratio"]  # (passively cooled: not supported)
    snapshot = fake_snapshot(sampler.latest)
    rendered = {family.name: family for family in metrics.families(snapshot)}
    gpu_names = {spec.name for spec in metrics.METRICS if spec.scope in ("gpu", "thermal")}
    exposed = {name + "_total" if family.type == "counter" else name for name, family in rendered.items()}
    assert gpu_names - {"libremote_gpu_fan_speed_ratio", "libremote_gpu_xid_events_total"} <= exposed
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in rendered.values() for s in f.samples}
    labels = (("device", "0"), ("uuid", "GPU-1234"))
    assert samples[("libremote_gpu_temperature_celsius", labels)] == 61
    assert samples[("libremote_gpu_power_watts", labels)] == 312.5
    assert samples[("libremote_gpu_throttled", tuple(sorted(labels + (("reason", "sw_power_cap"),))))] == 1
    assert samples[("libremote_gpu_throttled", tuple(sorted(labels + (("reason", "hw_slowdown"),))))] == 0
    assert samples[("libremote_gpu_ecc_errors_total", tuple(sorted(labels + (("type", "corrected"),))))] == 3
    assert samples[("libremote_host_temperature_celsius", ())] == 55.0
    sampler.stop()


def test_xid_ecc_temperature_and_a_lost_gpu_make_a_device_unhealthy():
    nvml = fake_nvml(xids=[13, 31])  # a program's own faults (illegal address): not the device's
    sampler = sampler_with(nvml)
    sampler.start()
    row = wait_sample(sampler, lambda row: row["xid_events"] == {"13": 1, "31": 1})
    assert row["healthy"]
    nvml.figures["xids"].append(79)
    row = wait_sample(sampler, lambda row: "79" in row["xid_events"])
    assert not row["healthy"] and [r["kind"] for r in row["reasons"]] == ["xid"]
    assert "fallen off the bus" in row["reasons"][0]["message"]
    sampler.stop()

    nvml = fake_nvml(ecc_uncorrected=2, temperature=90)
    sampler = sampler_with(nvml)
    sampler.start()
    assert {r["kind"] for r in sampler.sample()["devices"][0]["reasons"]} == {"ecc", "temperature"}
    nvml.figures.update(ecc_uncorrected=0, temperature=85)  # cooler, but not 5 degrees below the limit (87)
    assert [r["kind"] for r in sampler.sample()["devices"][0]["reasons"]] == ["temperature"]
    nvml.figures["temperature"] = 80
    assert sampler.sample()["devices"][0]["healthy"]
    nvml.figures["lost"] = True
    assert "lost" in {r["kind"] for r in sampler.sample()["devices"][0]["reasons"]}
    sampler.stop()


def test_without_nvml_a_daemon_reports_what_the_host_can(tmp_path):
    from libremote_server.telemetry.health import DeviceRef, HealthSampler

    sampler = HealthSampler([DeviceRef(0, "cuda:0", None)], nvml=None, interval_s=0)
    sampler.start()
    row = sampler.sample()["devices"][0]
    assert row["healthy"] and row["source"] == "none" and "nvidia-ml-py is not installed" in row["unavailable_because"]

    class Broken:
        def __getattr__(self, name):
            raise RuntimeError("libnvidia-ml.so.1: cannot open shared object file")

    sampler = HealthSampler([DeviceRef(0, "cuda:0", None)], nvml=Broken(), interval_s=0)
    sampler.start()
    assert "NVML is not available" in sampler.sample()["devices"][0]["unavailable_because"]
    with MetricsDaemon() as server:
        report = json.loads(cli("status", "--server", server.address, "--json").stdout)
        health = report["devices"][0]["health"]
        assert health["healthy"] and health["source"] == "host"
        assert health["power_w"] is None and "power_w" in health["unavailable"]
        assert "CPU backend" in health["unavailable_because"]
        assert report["host"]["memory_total_bytes"] > 0 and report["host"]["cpus"] >= 1
        text = cli("status", "--server", server.address).stdout
        assert "healthy" in text and "GPU figures not available" in text


def test_an_unhealthy_device_takes_no_new_sessions_and_says_why(tmp_path):
    inject = tmp_path / "health.json"
    inject.write_text("{}")
    with MetricsDaemon("--health-inject", str(inject), "--health-interval", "0.2") as server:
        holder = spawn_holder(server.address, tmp_path, "a", LIBREMOTE_TENANT="research")
        session = wait_holding(holder, tmp_path, "a")
        inject.write_text(json.dumps({"0": {"xid": [79], "temperature_c": 97}}))
        samples = server.wait_metric(lambda s: value(s, "libremote_device_healthy", device="0") == 0
                                     and value(s, "libremote_ready") == 0, "unhealthy")  # (the loop applies it)
        assert value(samples, "libremote_device_unhealthy", device="0", reason="xid") == 1
        assert value(samples, "libremote_device_unhealthy", device="0", reason="temperature") == 1
        assert value(samples, "libremote_device_unhealthy", device="0", reason="ecc") == 0
        assert value(samples, "libremote_ready") == 0
        code, body = server.get("/readyz")
        assert code == 503 and "no healthy device" in body and "XID 79" in body
        report = json.loads(cli("status", "--server", server.address, "--json").stdout)
        health = report["devices"][0]["health"]
        assert not health["healthy"] and {r["kind"] for r in health["reasons"]} == {"xid", "temperature"}
        assert "UNHEALTHY" in cli("status", "--server", server.address).stdout
        refused = run_python("import torch, libremote; torch.ones(1, device='cuda')", timeout=120,
                             LIBREMOTE_SERVER=server.address)
        assert refused.returncode != 0 and "unhealthy" in refused.stderr and "XID 79" in refused.stderr, refused.stderr
        assert release(holder, tmp_path, "a").strip() == session  # (its session went on)
        server.wait_metric(lambda s: value(s, "libremote_refusals_total", reason="unhealthy") == 1, "the refusal")
        assert "device 0 (cpu) is unhealthy and takes no new sessions" in server.log()


def fake_snapshot(health):
    """A published snapshot around ``health`` (a daemon's figures otherwise empty)."""
    from libremote_server.telemetry.collect import FrontCounters

    health = dict(health, host={**health["host"], "temperature_c": 55.0})
    return {"time": 0.0, "status": {
        "daemon": {"torch": "2.x", "worker_crashes": 0, "draining": None},
        "devices": [{"index": 0, "device": "cuda:0", "name": "H100", "memory_used": 0, "memory_total": 1,
                     "utilization": 0.0, "sessions": 0, "busy_s": 0.0}],
        "sessions": [], "waiting": [], "workers": []},
        "counters": FrontCounters().copy(), "tenants": {}, "health": health, "ready": True, "ready_reason": "ready",
        "polls": 1, "history": (), "worker_rejected": {}}


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
