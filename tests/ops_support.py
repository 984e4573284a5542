"""Helpers for the operations tests (metrics, health, dashboard, Prometheus, deployment): a daemon
with its HTTP endpoint, a client that holds a session until told to let go, scrapes, and the
Debian tools the tests drive (prometheus, promtool, chromium, chromedriver).

A missing tool skips its test with the command that installs it, except in CI (``CI`` set), where
it fails: scripts/system_packages.sh installs them there, so a missing one is a broken set-up, not
a reason to pass quietly.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, Daemon, free_port, subprocess_env
from helpers import spawn_client

#: Where tests keep what a person may want to look at afterwards (the dashboard's screenshot).
ARTIFACTS = Path(os.environ.get("LIBREMOTE_TEST_ARTIFACTS", REPO / "build" / "test-artifacts"))


def require_tool(name: str, package: str) -> str:
    """The path of ``name``; skip (locally) or fail (CI) when it is not installed."""
    path = shutil.which(name) or next((p for p in (f"/usr/bin/{name}", f"/usr/lib/chromium/{name}")
                                       if os.access(p, os.X_OK)), None)
    if path:
        return path
    message = (f"{name} is not installed: `apt-get install {package}` (scripts/system_packages.sh does it for "
               "scripts/test.sh and CI)")
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


class MetricsDaemon(Daemon):
    """A daemon with ``--metrics-listen`` on a free loopback port; ``url`` is its endpoint."""

    def __init__(self, *args: str, token: str | None = None, interval: float = 0.3, **kwargs: Any) -> None:
        self.metrics_port = free_port()
        self.url = f"http://127.0.0.1:{self.metrics_port}"
        self.token = token
        super().__init__("--metrics-listen", f"127.0.0.1:{self.metrics_port}", "--metrics-interval", str(interval),
                         *args, **kwargs)

    def __enter__(self) -> MetricsDaemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def get(self, path: str, *, token: str | None = None, basic: bool = False, timeout: float = 10.0) -> tuple[int, str]:
        """(HTTP status, body) of GET ``path``."""
        request = urllib.request.Request(self.url + path)
        token = token if token is not None else self.token
        if token is not None:
            request.add_header("Authorization", ("Basic " + base64.b64encode(f"x:{token}".encode()).decode())
                               if basic else f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def scrape(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        """The exposition, parsed: sample name -> [(labels, value)]."""
        from prometheus_client.parser import text_string_to_metric_families

        code, text = self.get("/metrics")
        assert code == 200, (code, text)
        samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
        return samples

    def wait_metric(self, predicate: Callable[[dict[str, Any]], bool], what: str, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        samples: dict[str, Any] = {}
        while time.monotonic() < deadline:
            samples = self.scrape()
            if predicate(samples):
                return samples
            time.sleep(0.2)
        raise AssertionError(f"the metrics never showed {what} within {timeout} s; log:\n{self.log()[-4000:]}")


def value(samples: dict[str, Any], name: str, **labels: str) -> float | None:
    """The value of the sample ``name`` whose labels include ``labels`` (None: absent)."""
    for sample_labels, sample_value in samples.get(name, ()):
        if all(sample_labels.get(key) == wanted for key, wanted in labels.items()):
            return sample_value
    return None


def spawn_holder(address: str, folder: Path, name: str, **env: str) -> subprocess.Popen:
    """A client that opens a session, announces it in DIR/NAME.in (its session id), does some work and
    holds its tensors until :func:`release` (tests/programs/compute_then_hold_a_session_until_go.py)."""
    return spawn_client("compute_then_hold_a_session_until_go.py", address, NAME=name, DIR=str(folder), **env)


def wait_holding(client: subprocess.Popen, folder: Path, name: str, timeout: float = 120.0) -> str:
    """The session id of a holder once it holds its session."""
    path = folder / f"{name}.in"
    deadline = time.monotonic() + timeout
    while not path.exists():
        if client.poll() is not None or time.monotonic() > deadline:
            client.kill()
            out, err = client.communicate()
            raise AssertionError(f"the client did not open its session ({client.returncode}):\n{out}\n{err}")
        time.sleep(0.05)
    return path.read_text()


def release(client: subprocess.Popen, folder: Path, name: str, timeout: float = 60.0) -> str:
    (folder / f"{name}.go").write_text("")
    try:
        out, err = client.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        client.kill()
        out, err = client.communicate()
        raise AssertionError(f"the client did not finish:\n{out}\n{err}") from None
    assert client.returncode == 0, err
    return out


def cli(*args: str, timeout: float = 60.0, **env: str) -> subprocess.CompletedProcess:
    """The ``libremote`` command in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "libremote_wire.cli", *args], env=subprocess_env(**env), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


METRICS_DOC = REPO / "docs" / "METRICS.md"


def documented_names() -> dict[str, str]:
    """name -> its "present" cell, from docs/METRICS.md's table."""
    names = {}
    for line in METRICS_DOC.read_text().splitlines():
        match = re.match(r"\| `(libremote_\w+)` \| (\w+) \| [^|]* \| ([^|]+) \|", line)
        if match:
            names[match.group(1)] = match.group(3).strip()
    return names
