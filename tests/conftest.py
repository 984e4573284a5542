"""Fixtures: a real daemon process on a free loopback port, and a client session against it.

The daemon runs ``python -m libremote_server --device cpu`` from this checkout (``PYTHONPATH``),
exactly as a user would start it; tests compare remote results with plain local torch.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent

# OpenMP threads waiting for work spin by default (libgomp reads this when torch loads it, so it
# is set before any test imports torch; daemons and client subprocesses inherit it). With pytest
# workers, daemons and clients sharing two cores, the spinning threads of the processes waiting
# on each other took the cores from the one working: tests/test_exact_training.py ran in 101 s
# with two workers instead of 14 s in one process. Waiting passively changes no result.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# tests/programs/ holds the client programs the tests run in their own interpreters, not tests.
collect_ignore = ["programs"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.pop("LIBREMOTE_SERVER", None)
    env.update(extra)
    return env


class Daemon:
    """A libremote-server subprocess; ``address`` is where it listens."""

    def __init__(self, *args: str, device: str = "", python: str = sys.executable) -> None:
        # LIBREMOTE_TEST_DEVICE=cuda runs tests written for the CPU backend against a GPU daemon
        # (scripts/device_run.sh): the isolation and op-rule checks must hold there too.
        device = device or os.environ.get("LIBREMOTE_TEST_DEVICE", "cpu")
        for attempt in range(3):
            self.port = free_port()
            self.address = f"tcp://127.0.0.1:{self.port}"
            self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"libremote-daemon-{self.port}.log"
            self._log = open(self.log_path, "w+")
            self.process = subprocess.Popen(
                [python, "-m", "libremote_server", "--listen", self.address, "--device", device, *args],
                env=subprocess_env(),
                cwd=REPO,
                stdout=self._log,
                stderr=subprocess.STDOUT,
            )
            try:
                self._wait_listening()
                return
            except RuntimeError:
                # Tests run in parallel workers: another one may have taken the free port
                # between free_port() and the daemon's bind. Anything else is a real failure.
                self._log.close()
                if "Address already in use" not in self.log_path.read_text() or attempt == 2:
                    raise

    def _wait_listening(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited early:\n{self.log()}")
            if "listening on" in self.log():
                return
            time.sleep(0.05)
        raise RuntimeError(f"daemon did not start within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@pytest.fixture(scope="session")
def daemon() -> Iterator[Daemon]:
    server = Daemon()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def remote(daemon: Daemon):
    """A connected client session (libremote imported in this test process)."""
    import libremote

    libremote.connect(daemon.address)
    yield libremote
    libremote.disconnect()


@pytest.fixture
def raw(daemon: Daemon):
    """A raw client (tests/raw_client.py) that has said HELLO to the shared daemon."""
    from libremote_wire.messages import Msg

    from raw_client import RawClient

    with RawClient(daemon.address) as client:
        header = client.hello()
        assert header[0] == Msg.WELCOME, header
        yield client


@pytest.fixture
def own_daemon():
    """A daemon for this test alone (for tests that kill it, signal it or read its log)."""
    server = Daemon()
    yield server
    if server.process.poll() is None:
        server.process.kill()
        server.process.wait()
    server.stop()


@contextlib.contextmanager
def client_connected_to(address: str) -> Iterator[Any]:
    """This process's libremote client connected to ``address`` for the block, then back to the
    daemon it was connected to before. The ``remote`` fixture's session is shared by every test
    of the run, so a test that talks to a daemon of its own in-process must hand it back."""
    import libremote
    from libremote.client import runtime

    previous = runtime.configured_address() if runtime.current_if_open() is not None else None
    libremote.connect(address)
    try:
        yield libremote
    finally:
        libremote.disconnect()
        if previous is not None:
            libremote.connect(previous)
