"""The daemon's Prometheus metrics (issue 22): a real daemon with ``--metrics-listen``, real
clients, its ``/metrics`` scraped and parsed with prometheus-client's own parser.

- every name docs/METRICS.md documents is exposed (GPU ones through NVML: tests/test_health.py),
  and every exposed name is documented;
- per device, tenant and session figures follow a session's work, and a tenant's counters keep an
  ended session's counts;
- refusals, malformed messages, reconnects and drains are counted; label values stay bounded;
- access: loopback only unless a token (Bearer or Basic) or --metrics-insecure; probes are open;
- structured logs (--log-format json) carry event, session, tenant and request ids.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import prometheus_client  # noqa: F401  (requirements-dev.txt: the endpoint needs it)
import zmq

from conftest import REPO, free_port, subprocess_env
from helpers import run_python
from ops_support import (
    MetricsDaemon,
    cli,
    documented_names,
    release,
    spawn_holder,
    value,
    wait_holding,
)

METRICS_DOC = REPO / "docs" / "METRICS.md"


def exposed_names(samples: dict) -> set[str]:
    """Metric names from sample names (counters' _total kept; summaries' _sum/_count folded)."""
    names = set()
    for name in samples:
        names.add(re.sub(r"_(sum|count|created)$", "", name) if not name.endswith("_total") else name)
    return names


def test_the_documented_table_is_the_declarations():
    from libremote_server.telemetry import metrics

    assert set(documented_names()) == {spec.name for spec in metrics.METRICS}
    assert metrics.markdown() in METRICS_DOC.read_text(), (
        "docs/METRICS.md's table is stale: rerun `python -m libremote_server.telemetry.metrics`")
    for spec in metrics.METRICS:  # Prometheus' conventions
        assert re.fullmatch(r"libremote_[a-z0-9_]+", spec.name), spec.name
        assert spec.name.endswith("_total") == (spec.type == "counter"), spec.name
        assert not {"op", "op_name", "argv", "host", "pid"} & set(spec.labels), spec.name


def test_every_documented_metric_is_exposed_and_follows_a_session(tmp_path):
    documented = documented_names()
    with MetricsDaemon("--device-memory", "64MiB", "--host-spill", "256MiB") as server:
        client = spawn_holder(server.address, tmp_path, "a", LIBREMOTE_TENANT="research")
        try:
            session = wait_holding(client, tmp_path, "a")
            samples = server.wait_metric(
                lambda s: (value(s, "libremote_session_ops_total", session=session) or 0) > 20, "the session's ops")
            missing = {name for name, present in documented.items()
                       if "NVML" not in present and "thermal" not in present  # (tests/test_health.py)
                       and name not in exposed_names(samples)}
            assert not missing, f"documented but not exposed: {sorted(missing)}"
            undocumented = exposed_names(samples) - set(documented)
            assert not undocumented, f"exposed but not in docs/METRICS.md: {sorted(undocumented)}"
            assert value(samples, "libremote_session_info", session=session, tenant="research", device="0") == 1
            assert value(samples, "libremote_session_received_bytes_total", session=session) == 0  # (made on the device)
            assert value(samples, "libremote_session_sent_bytes_total", session=session) == 256 * 256 * 4  # x.cpu()
            assert value(samples, "libremote_tenant_sessions", tenant="research") == 1
            assert value(samples, "libremote_tenant_admissions_total", tenant="research", outcome="admitted") == 1
            assert value(samples, "libremote_device_sessions", device="0") == 1
            assert value(samples, "libremote_device_memory_used_bytes", device="0") >= 256 * 256 * 4
            assert value(samples, "libremote_device_memory_budget_bytes", device="0") == 64 << 20
            assert value(samples, "libremote_device_healthy", device="0") == 1
            assert value(samples, "libremote_ready") == 1
            assert value(samples, "libremote_front_messages_total", kind="hello") == 1
            ops = value(samples, "libremote_session_ops_total", session=session)
        finally:
            if client.poll() is None:
                release(client, tmp_path, "a")
        samples = server.wait_metric(lambda s: value(s, "libremote_sessions") == 0
                                     and value(s, "libremote_tenant_sessions_ended_total", tenant="research") == 1,
                                     "the session's end")
        assert value(samples, "libremote_session_ops_total", session=session) is None  # (its series ended)
        assert value(samples, "libremote_tenant_ops_total", tenant="research") >= ops  # (its tenant kept them)
        assert value(samples, "libremote_tenant_sent_bytes_total", tenant="research") == 256 * 256 * 4


def test_refusals_malformed_messages_reconnects_and_drain_are_counted(tmp_path):
    with MetricsDaemon("--loopback-admin") as server:
        context = zmq.Context()
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(server.address)
        for garbage in (b"\xc1", b"\x93\x01\x02", b"\x91\xa3abc"):
            sock.send(garbage)
            assert sock.poll(10_000), "the front answered a malformed message"
            sock.recv()
        sock.close()
        context.term()
        assert cli("admin", "--server", server.address, "--drain").returncode == 0
        code, body = server.get("/readyz")
        assert code == 503 and "draining" in body
        refused = run_python("import torch, libremote; torch.ones(1, device='cuda')", timeout=120,
                             LIBREMOTE_SERVER=server.address, LIBREMOTE_TENANT="late")
        assert refused.returncode != 0 and "draining" in refused.stderr, refused.stderr[-2000:]
        samples = server.wait_metric(lambda s: value(s, "libremote_refusals_total", reason="draining") == 1,
                                     "the refusal")
        assert value(samples, "libremote_draining") == 1 and value(samples, "libremote_ready") == 0
        assert value(samples, "libremote_tenant_admissions_total", tenant="late", outcome="refused") == 1
        assert value(samples, "libremote_rejected_messages_total", where="front", reason="malformed") == 3
        assert "DRAINING" in cli("status", "--server", server.address).stdout
        assert cli("admin", "--server", server.address, "--undrain").returncode == 0
        assert server.get("/readyz") == (200, "ready\n")
        # The same client process twice: the second HELLO is a reconnect.
        code = ("import torch, libremote\nfor _ in range(2):\n"
                "    libremote.connect(); torch.ones(1, device='cuda').sum().item(); libremote.disconnect()\n")
        done = run_python(code, timeout=120, LIBREMOTE_SERVER=server.address)
        assert done.returncode == 0, done.stderr[-2000:]
        server.wait_metric(lambda s: value(s, "libremote_reconnects_total") == 1, "a reconnect")


def test_tenant_labels_stay_bounded():
    from libremote_server.telemetry.collect import (
        MAX_TENANTS,
        OTHER_TENANTS,
        FrontCounters,
    )

    counters = FrontCounters()
    for index in range(MAX_TENANTS + 50):
        counters.admission(f"claimed-{index}", "queued")
    tenants = {tenant for tenant, _ in counters.admissions}
    assert len(tenants) == MAX_TENANTS + 1 and OTHER_TENANTS in tenants


def test_the_endpoint_wants_a_token_off_loopback_and_when_given_one(tmp_path):
    refused = subprocess.run([sys.executable, "-m", "libremote_server", "--device", "cpu", "--metrics-listen",
                              f"0.0.0.0:{free_port()}"], env=subprocess_env(), cwd=REPO, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 2 and "--metrics-token-file" in refused.stderr, refused.stderr
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    with MetricsDaemon("--metrics-token-file", str(token_file)) as server:
        assert server.get("/metrics", token="")[0] == 401
        assert server.get("/metrics", token="wrong")[0] == 401
        assert server.get("/api/snapshot", token="")[0] == 401
        assert server.get("/metrics", token="s3cret-token")[0] == 200
        assert server.get("/", token="s3cret-token", basic=True)[0] == 200  # (a browser's prompt)
        assert server.get("/healthz", token="") == (200, "ok\n")  # probes need none, and say nothing else
        assert server.get("/readyz", token="") == (200, "ready\n")


def test_json_logs_carry_event_session_tenant_and_request_ids(tmp_path):
    with MetricsDaemon("--log-format", "json") as server:
        client = spawn_holder(server.address, tmp_path, "a", LIBREMOTE_TENANT="research")
        session = wait_holding(client, tmp_path, "a")
        release(client, tmp_path, "a")
        deadline = time.monotonic() + 30
        while '"session_end"' not in server.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        lines = [line for line in server.log().splitlines() if line.strip()]
    entries = []
    for line in lines:
        entry = json.loads(line)  # every line is one JSON object
        assert {"time", "level", "logger", "pid", "process", "message"} <= set(entry), entry
        entries.append(entry)
    admission = [e for e in entries if e.get("event") == "admission"]
    assert len(admission) == 1
    assert admission[0]["session"] == session and admission[0]["tenant"] == "research" and admission[0]["request"]
    ends = [e for e in entries if e.get("event") == "session_end" and e.get("session") == session]
    assert {e["process"] for e in ends} == {"front", "worker"}, ends
    assert all(e["tenant"] == "research" for e in ends)
    assert ends[0].get("request") in (None, admission[0]["request"]) or ends[1].get("request") == admission[0]["request"]
