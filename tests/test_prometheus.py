"""Prometheus against libremote (issue 22): the alerting rules pass ``promtool check`` and their
unit tests, the rules and the Grafana dashboard use documented metrics only, and a real Prometheus
server (Debian's ``prometheus``, on a free loopback port) scrapes a real daemon with its token,
sees a session, loads the rules, evaluates every dashboard query, and raises the device alert when
the daemon's device turns unhealthy.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from conftest import REPO, free_port
from ops_support import (
    MetricsDaemon,
    documented_names,
    release,
    require_tool,
    spawn_holder,
    wait_holding,
)

RULES = REPO / "deploy" / "prometheus" / "libremote-rules.yml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "libremote-rules.test.yml"
GRAFANA = REPO / "deploy" / "grafana" / "libremote-dashboard.json"


def _metric_names(text: str) -> set[str]:
    return set(re.findall(r"\blibremote_[a-z0-9_]+\b", text))


def _grafana_exprs() -> list[str]:
    dashboard = json.loads(GRAFANA.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", ())]


def test_promtool_checks_and_unit_tests_the_alerting_rules():
    promtool = require_tool("promtool", "prometheus")
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run([promtool, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, timeout=120,
                          cwd=RULE_TESTS.parent)
    assert test.returncode == 0, test.stdout + test.stderr
    alerts = set(re.findall(r"alert: (\w+)", RULES.read_text()))
    assert {"LibremoteDaemonDown", "LibremoteDeviceUnhealthy", "LibremoteTenantAtQuota", "LibremoteQueueWaiting",
            "LibremoteSpillThrashing"} <= alerts
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert alerts == tested, f"alerts without a unit test: {alerts - tested}"


def test_rules_and_the_grafana_dashboard_use_documented_metrics_only():
    documented = set(documented_names())
    suffixes = re.compile(r"_(sum|count|bucket)$")
    for name in _metric_names(RULES.read_text()) | _metric_names(" ".join(_grafana_exprs())):
        assert name in documented or suffixes.sub("", name) in documented, f"{name} is not in docs/METRICS.md"
    dashboard = json.loads(GRAFANA.read_text())
    assert dashboard["uid"] and dashboard["panels"] and all(panel.get("targets") for panel in dashboard["panels"])


class Prometheus:
    """A Prometheus server on a free loopback port with its own storage, stopped on exit."""

    def __init__(self, tmp_path, config: dict) -> None:
        import yaml

        binary = require_tool("prometheus", "prometheus")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config_path = tmp_path / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        promtool = shutil.which("promtool")
        if promtool:
            checked = subprocess.run([promtool, "check", "config", str(config_path)], capture_output=True, text=True,
                                     timeout=60)
            assert checked.returncode == 0, checked.stdout + checked.stderr
        self.log_path = tmp_path / "prometheus.log"
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [binary, f"--config.file={config_path}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=tmp_path)

    def __enter__(self) -> Prometheus:
        self.wait(lambda: self.api("status/buildinfo")["status"] == "success", "Prometheus to start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()

    def api(self, path: str, **params: str) -> dict:
        url = f"{self.url}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read())
        except OSError as exc:
            return {"status": "unreachable", "error": str(exc)}

    def query(self, expr: str) -> list[dict]:
        answer = self.api("query", query=expr)
        assert answer["status"] in ("success", "unreachable"), (expr, answer)
        return answer.get("data", {}).get("result", [])

    def wait(self, predicate, what: str, timeout: float = 90.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"Prometheus exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                result = predicate()
            except (KeyError, IndexError, TypeError):
                result = None
            if result:
                return result
            time.sleep(0.5)
        raise AssertionError(f"Prometheus never showed {what} within {timeout} s:\n{self.log_path.read_text()[-3000:]}")


def test_a_real_prometheus_scrapes_a_real_daemon_and_raises_its_alerts(tmp_path):
    token = tmp_path / "metrics-token"
    token.write_text("prometheus-reads-this\n")
    inject = tmp_path / "health.json"
    inject.write_text("{}")
    with MetricsDaemon("--metrics-token-file", str(token), "--health-inject", str(inject), "--health-interval", "0.5",
                       token="prometheus-reads-this") as daemon:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{
                "job_name": "libremote", "metrics_path": "/metrics",
                "authorization": {"type": "Bearer", "credentials_file": str(token)},
                "static_configs": [{"targets": [f"127.0.0.1:{daemon.metrics_port}"]}],
            }],
        }
        with Prometheus(tmp_path, config) as prometheus:
            prometheus.wait(lambda: prometheus.query('up{job="libremote"} == 1'), "the daemon up")
            assert prometheus.query("libremote_ready == 1")
            groups = prometheus.api("rules")["data"]["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            assert {rule["name"] for rule in rules} >= {"LibremoteDaemonDown", "LibremoteDeviceUnhealthy"}
            holder = spawn_holder(daemon.address, tmp_path, "a", LIBREMOTE_TENANT="research")
            try:
                session = wait_holding(holder, tmp_path, "a")
                found = prometheus.wait(lambda: prometheus.query(f'libremote_session_ops_total{{session="{session}"}} > 0'),
                                        "the session's ops")
                assert found[0]["metric"]["tenant"] == "research"
                assert prometheus.wait(lambda: prometheus.query('libremote_tenant_sessions{tenant="research"} == 1'),
                                       "the tenant's session")
                for expr in _grafana_exprs():  # every dashboard query is valid PromQL over these series
                    prometheus.query(expr.replace("$instance", ".*"))
                assert prometheus.query(
                    'sum by (tenant) (libremote_tenant_sessions{instance=~".*"})')[0]["metric"]["tenant"] == "research"
                inject.write_text(json.dumps({"0": {"ecc_uncorrected": 1}}))
                alerts = prometheus.wait(
                    lambda: [a for a in prometheus.api("alerts")["data"]["alerts"]
                             if a["labels"]["alertname"] == "LibremoteDeviceUnhealthy"], "the device alert")
                assert alerts[0]["state"] in ("pending", "firing") and alerts[0]["labels"]["device"] == "0"
                assert prometheus.query('libremote_device_unhealthy{reason="ecc"} == 1')
            finally:
                if holder.poll() is None:
                    release(holder, tmp_path, "a")
            assert all(not rule.get("lastError") for group in prometheus.api("rules")["data"]["groups"]
                       for rule in group["rules"])


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__]))
