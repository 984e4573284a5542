"""Deployment files (issue 22): the Kubernetes manifests validate against the API's schemas
(kubernetes-validate, strict: an unknown field fails), the DaemonSet asks for the NVIDIA device
plugin's resource on GPU nodes, takes its keys from Secrets and probes what means something; the
systemd unit delegates its cgroup and sandboxes the daemon; the container image and both run the
daemon with a command line it accepts; docs/DEPLOYMENT.md names them all.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from conftest import REPO

DEPLOY = REPO / "deploy"

KUBERNETES_VERSION = "1.30"


def _documents() -> list[tuple[Path, dict]]:
    return [(path, document) for path in sorted((DEPLOY / "kubernetes").glob("*.yaml"))
            for document in yaml.safe_load_all(path.read_text()) if document]


def _daemon_args(args: list[str]) -> None:
    """``args`` is a command line libremote-server accepts (flags and their values)."""
    from libremote_server import cli, policy

    parsed = cli.build_parser().parse_args(args)
    config = policy.PoolConfig(admin_token=None)
    if parsed.metrics_listen and not parsed.metrics_token_file:
        cli.telemetry_config(parsed, config)  # (a token file would have to exist here)
    assert parsed.log_format == "json" and parsed.metrics_listen


def test_the_kubernetes_manifests_validate_strictly():
    documents = _documents()
    assert {document["kind"] for _, document in documents} >= {"DaemonSet", "Service", "Secret", "ConfigMap"}
    for _path, document in documents:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    broken = yaml.safe_load((DEPLOY / "kubernetes" / "daemonset.yaml").read_text())
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGett"] = {"path": "/healthz"}
    with pytest.raises(kubernetes_validate.ValidationError):  # (strict validation catches a typo)
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_the_daemonset_runs_on_gpu_nodes_with_keys_from_secrets_and_meaningful_probes():
    daemonset = next(document for _, document in _documents() if document["kind"] == "DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert "nvidia.com/gpu" in container["resources"]["limits"]  # the NVIDIA device plugin's resource
    assert pod["nodeSelector"] or pod.get("affinity")
    secrets = {volume["secret"]["secretName"] for volume in pod["volumes"] if "secret" in volume}
    assert secrets == {"libremote-keys", "libremote-metrics-token"}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["securityContext"]["readOnlyRootFilesystem"] and pod["securityContext"]["runAsNonRoot"]
    args = container["args"]
    _daemon_args(args)
    metrics_port = next(port["containerPort"] for port in container["ports"] if port["name"] == "metrics")
    assert f"--metrics-listen=0.0.0.0:{metrics_port}" in args
    service = next(document for _, document in _documents() if document["kind"] == "Service")
    assert service["spec"]["selector"] == daemonset["spec"]["selector"]["matchLabels"]


def _unit() -> dict[str, list[str]]:
    entries: dict[str, list[str]] = {}
    section = ""
    for line in (DEPLOY / "systemd" / "libremote-server.service").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.setdefault(f"{section}.{key}", []).append(value)
    return entries


def test_the_systemd_unit_delegates_its_cgroup_and_sandboxes_the_daemon(tmp_path):
    unit = _unit()
    assert unit["Service.Delegate"] == ["yes"]  # workers' memory.max (server/os_limits.py)
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
                       "RestrictSUIDSGID": "yes", "DevicePolicy": "closed", "CapabilityBoundingSet": ""}.items():
        assert unit[f"Service.{key}"] == [value], key
    assert "Service.ProtectControlGroups" not in unit  # (it would make the delegated cgroup read-only)
    assert any(allow.startswith("char-nvidia-frontend") for allow in unit["Service.DeviceAllow"])
    assert unit["Service.User"] != ["root"] and unit["Install.WantedBy"] == ["multi-user.target"]
    command = shlex.split(unit["Service.ExecStart"][0])
    assert command[0].endswith("libremote-server")
    _daemon_args(command[1:])
    analyze = shutil.which("systemd-analyze")
    if analyze:  # (where systemd is installed: its own check of the unit's syntax)
        copy = tmp_path / "libremote-server.service"
        copy.write_text((DEPLOY / "systemd" / "libremote-server.service").read_text().replace(
            "/opt/libremote/bin/libremote-server", shutil.which("true") or "/bin/true"))
        result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
        assert "Unknown key" not in result.stderr and "Failed to parse" not in result.stderr, result.stderr


def test_the_container_image_runs_the_daemon_with_its_metrics_and_probes():
    text = (DEPLOY / "Containerfile").read_text()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert lines[0].startswith("FROM ")
    assert any(line.startswith("USER ") and not line.startswith("USER root") for line in lines)
    assert '[metrics]' in text and "/healthz" in text
    import json

    entrypoint = json.loads(next(line for line in lines if line.startswith("ENTRYPOINT"))[len("ENTRYPOINT"):])
    command = json.loads(next(line for line in lines if line.startswith("CMD"))[len("CMD"):])
    assert entrypoint == ["libremote-server"]
    _daemon_args(command)
    assert ".venv" in (REPO / ".dockerignore").read_text()


def test_the_deployment_page_names_every_file():
    page = (REPO / "docs" / "DEPLOYMENT.md").read_text()
    for path in [*DEPLOY.rglob("*.y*ml"), *DEPLOY.rglob("*.json"), DEPLOY / "Containerfile",
                 DEPLOY / "systemd" / "libremote-server.service"]:
        assert str(path.relative_to(REPO)) in page, f"docs/DEPLOYMENT.md does not mention {path.relative_to(REPO)}"
