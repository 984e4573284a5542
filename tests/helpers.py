"""Shared helpers for pool tests: daemons with pool flags, client subprocesses, the libremote CLI.

The client-process helpers (``spawn_client``, ``finish``, ``wait_for_file``, ``wait_for_log``,
``run_python``, ``last_json``) are the ones from ``test_faults``; this module adds the ``libremote``
CLI (``status``/``admin``) and a daemon context manager that always cleans up.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from conftest import REPO, Daemon, free_port, subprocess_env  # noqa: F401  (re-exported)
from test_faults import finish, last_json, run_python, spawn_client, wait_for_file, wait_for_log  # noqa: F401

#: Generous upper bound for a client subprocess to finish ("it did not hang", not a speed check).
CLIENT_TIMEOUT_S = 120.0


@contextlib.contextmanager
def pool_daemon(*args: str, device: str = "cpu") -> Iterator[Daemon]:
    """A daemon subprocess with extra CLI flags, stopped (or killed) on the way out."""
    server = Daemon(*args, device=device)
    try:
        yield server
    finally:
        server.stop()


def cli(*args: str, timeout: float = 60.0, **env: str) -> subprocess.CompletedProcess:
    """``python -m libremote_wire.cli ARGS`` (the ``libremote`` command) in a fresh interpreter."""
    environment = subprocess_env(**env)
    if "LIBREMOTE_ADMIN_TOKEN" not in env:
        environment.pop("LIBREMOTE_ADMIN_TOKEN", None)
    return subprocess.run(
        [sys.executable, "-m", "libremote_wire.cli", *args],
        env=environment, cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )


def status(address: str, admin_token: str | None = None) -> dict[str, Any]:
    """The report ``libremote status --server ADDRESS --json`` prints, asked for in this process
    (the same request; a fresh interpreter per poll would cost seconds of importing torch). The
    command itself is tested through :func:`cli`. A daemon with a tenants file shows its whole
    pool to its admin only: pass ``admin_token`` (or start it with ``--loopback-admin``)."""
    from libremote_wire.cli import query_status

    return query_status(address, admin_token=admin_token)


def wait_status(address: str, predicate: Callable[[dict[str, Any]], bool], what: str,
                timeout: float = 60.0, clients: list[subprocess.Popen] = ()) -> dict[str, Any]:
    """Poll the status report until ``predicate(report)`` holds (fail after ``timeout``)."""
    deadline = time.monotonic() + timeout
    report: dict[str, Any] = {}
    while time.monotonic() < deadline:
        report = status(address)
        if predicate(report):
            return report
        for client in clients:
            if client.poll() is not None:
                out, err = client.communicate()
                raise AssertionError(f"a client exited ({client.returncode}) while waiting for {what}:\n{out}\n{err}")
        time.sleep(0.1)
    raise AssertionError(f"status never showed {what} within {timeout} s; last report:\n{json.dumps(report, indent=2)}")


def session_of(report: dict[str, Any], pid: int) -> dict[str, Any]:
    """The status row of the session whose client has process id ``pid``."""
    rows = [row for row in report["sessions"] if row["pid"] == pid]
    assert len(rows) == 1, f"expected one session of pid {pid}: {json.dumps(report['sessions'], indent=2)}"
    return rows[0]


def kill_all(clients: list[subprocess.Popen]) -> None:
    for client in clients:
        if client.poll() is None:
            client.kill()
            client.communicate()


#: A client that connects (possibly after waiting in the admission queue), announces itself with
#: ``DIR/NAME.in`` (holding its session id), holds a tensor until ``DIR/NAME.go`` exists, checks
#: the tensor, prints a JSON report and exits (saying goodbye). Environment: NAME, DIR.
HOLDING_CLIENT = """
    import json, os, time, torch, libremote
    from pathlib import Path
    name, folder = os.environ["NAME"], Path(os.environ["DIR"])
    try:
        x = torch.full((1024,), 2.0, device="cuda")
        assert x.sum().item() == 2048.0
    except libremote.ConnectionFailed as exc:
        print(json.dumps({"name": name, "admitted": False, "message": str(exc)}), flush=True)
        raise SystemExit(0)
    info = libremote.server_info()
    (folder / (name + ".tmp")).write_text(info["session"])
    os.replace(folder / (name + ".tmp"), folder / (name + ".in"))
    while not (folder / (name + ".go")).exists():
        time.sleep(0.05)
    total = (x * 3).sum().item()
    print(json.dumps({"name": name, "admitted": True, "session": info["session"], "total": total,
                      "priority": info.get("priority"), "tenant": info.get("tenant")}), flush=True)
"""


def spawn_holder(address: str, folder: Path, name: str, **env: str) -> subprocess.Popen:
    return spawn_client(HOLDING_CLIENT, address, NAME=name, DIR=str(folder), **env)
