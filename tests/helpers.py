"""Helpers shared by the test files: client programs in their own interpreters, daemons with
extra flags, the ``libremote`` CLI and the pool's status report.

Client programs live in ``tests/programs/`` (one file each, its docstring says what it does and
which environment variables it reads); :func:`run_python` and :func:`spawn_client` run one by its
file name (``run_python("quota_client.py", ...)``), or a line or two of code given inline. The
daemon fixtures (``daemon``, ``remote``, ``raw``, ``own_daemon``) are in ``conftest.py``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import preloaded

from conftest import REPO, Daemon, free_port, subprocess_env  # noqa: F401  (re-exported)

#: The client programs the tests run (``tests/programs/NAME.py``).
PROGRAMS = Path(__file__).resolve().parent / "programs"

#: Generous upper bound for a client subprocess to finish ("it did not hang", not a speed check).
CLIENT_TIMEOUT_S = 120.0


def program(name: str) -> str:
    """The path of the client program ``tests/programs/NAME`` (``name`` ends in ``.py``)."""
    path = PROGRAMS / name
    if not path.is_file():
        raise FileNotFoundError(f"no client program {name!r} in {PROGRAMS}")
    return str(path)


def _python_command(code: str, args: tuple[str, ...]) -> list[str]:
    """``python PROGRAM ARGS`` for a program's file name, ``python -c CODE ARGS`` for inline code."""
    if code.endswith(".py") and "\n" not in code and " " not in code:
        return [sys.executable, program(code), *args]
    return [sys.executable, "-c", textwrap.dedent(code), *args]


def _start_python(command: list[str], env: dict[str, str], fresh: bool) -> subprocess.Popen:
    """A client process, forked from a preloaded interpreter (tests/preloaded.py) unless
    ``fresh`` (a program that looks at what is imported), unless ``env`` changes what torch
    reads while loading, or unless LIBREMOTE_TEST_FRESH_CLIENTS=1 (every client a fresh exec)."""
    options: dict[str, Any] = {"cwd": REPO, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    base_env = subprocess_env()
    if fresh or os.environ.get("LIBREMOTE_TEST_FRESH_CLIENTS") == "1" or preloaded.needs_fresh_interpreter(base_env, env):
        return subprocess.Popen(command, env=env, **options)
    return preloaded.PreloadedPopen(command, base_env=base_env, env=env, **options)


def run_python(code: str, *args: str, timeout: float, fresh: bool = False, **env: str) -> subprocess.CompletedProcess:
    """Run a client program (a file name in ``tests/programs/``, or inline code) in its own
    process with libremote from this checkout; ``args`` are its command-line arguments and
    ``env`` its extra environment variables. ``fresh``: in a newly exec'd interpreter rather than
    one forked from the preloaded launcher (see :func:`_start_python`)."""
    command = _python_command(code, args)
    process = _start_python(command, subprocess_env(**env), fresh)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def last_json(output: str) -> dict[str, Any]:
    lines = [line for line in output.splitlines() if line.startswith("{")]
    assert lines, f"no JSON result in output:\n{output}"
    return json.loads(lines[-1])


def wait_for_file(path: Path, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"client exited early ({process.returncode}):\n{out}\n{err}")
        if time.monotonic() > deadline:
            process.kill()
            out, err = process.communicate()
            raise AssertionError(f"client did not get ready within {timeout} s:\n{out}\n{err}")
        time.sleep(0.05)


def wait_for_log(server: Daemon, text: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        log = server.log()
        if text in log:
            return log
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not in the daemon log within {timeout} s:\n{log}")
        time.sleep(0.05)


def start_program(code: str, *args: str, fresh: bool = False, **env: str) -> subprocess.Popen:
    """A program (a file name in ``tests/programs/``, a path, or inline code) in its own process,
    its output piped; ``args``, ``env`` and ``fresh`` as for :func:`run_python`."""
    return _start_python(_python_command(code, args), subprocess_env(**env), fresh)


def spawn_client(code: str, address: str, *args: str, fresh: bool = False, **env: str) -> subprocess.Popen:
    """A library client (a program's file name, or inline code) in its own process, opted in
    through LIBREMOTE_SERVER; ``args`` are its command-line arguments (``fresh`` as for
    :func:`run_python`)."""
    return start_program(code, *args, fresh=fresh, LIBREMOTE_SERVER=address, **env)


def finish(client: subprocess.Popen, what_went_wrong: str, timeout: float = 60.0) -> tuple[str, str]:
    """The client's output; if it does not end in time, kill it and fail with its output."""
    try:
        return client.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        client.kill()
        out, err = client.communicate()
        raise AssertionError(f"{what_went_wrong}:\n{out}\n{err}") from None


@functools.cache  # one probe (a fresh interpreter importing torch: seconds) per test run
def cuda_on_this_machine() -> bool:
    """Whether this machine has a CUDA device (asked of plain torch in a fresh interpreter: this
    process's own torch.cuda is libremote's facade)."""
    probe = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
        capture_output=True, text=True, env=subprocess_env(), timeout=120,
    )
    return probe.stdout.strip() == "True"


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


#: Connects (possibly after waiting in the admission queue), announces itself with
#: ``DIR/NAME.in``, holds a tensor until ``DIR/NAME.go`` exists, prints a JSON report and exits.
HOLDING_CLIENT = "holding_client.py"


def spawn_holder(address: str, folder: Path, name: str, **env: str) -> subprocess.Popen:
    """:data:`HOLDING_CLIENT` as client ``name``, its files in ``folder``."""
    return spawn_client(HOLDING_CLIENT, address, NAME=name, DIR=str(folder), **env)
