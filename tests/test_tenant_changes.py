"""Admin changes to a tenant reach its future sessions, with or without a tenants file (issue 20:
on a daemon with keys but no tenants file, a tenant's new weight and quota reverted on its next
session)."""

from __future__ import annotations

import json
import shutil

from libremote_wire import curve_keys
from libremote_wire.messages import Msg

from conftest import Daemon
from helpers import cli
from raw_client import RawClient


def test_a_tenants_new_weight_and_quota_reach_its_next_session_without_a_tenants_file(tmp_path):
    daemon_dir, clients_dir = tmp_path / "keys", tmp_path / "clients"
    curve_keys.generate(daemon_dir, "server")
    (daemon_dir / "admin").mkdir()
    for name in ("research", "boss"):
        public, _ = curve_keys.generate(clients_dir, name)
        shutil.copy(public, daemon_dir / ("admin" if name == "boss" else "") / public.name)
    server = Daemon("--auth-keys", str(daemon_dir))
    admin = {"LIBREMOTE_CLIENT_KEY": str(clients_dir / "boss.key_secret"),
             "LIBREMOTE_SERVER_KEY": str(daemon_dir / "server.key")}
    research = curve_keys.ClientKeys.from_files(str(clients_dir / "research.key_secret"), str(daemon_dir / "server.key"))
    try:
        with RawClient(server.address, curve=research) as first:
            assert first.hello()[0] == Msg.WELCOME
            changed = cli("admin", "--server", server.address, "--tenant", "research", "--weight", "3",
                          "--memory-quota", "256MiB", **admin)
            assert changed.returncode == 0, changed.stdout + changed.stderr
        with RawClient(server.address, curve=research) as second:  # a new session of the tenant
            assert second.hello()[0] == Msg.WELCOME
            assert second.welcome["memory_quota"] == 256 << 20, second.welcome
            rows = [row for row in _admin_status(server.address, admin)["sessions"]
                    if row["session"] == second.welcome["session"]]
            assert rows and rows[0]["weight"] == 3.0 and rows[0]["memory_quota"] == 256 << 20, rows
    finally:
        server.stop()


def _admin_status(address: str, admin: dict[str, str]) -> dict:
    shown = cli("status", "--server", address, "--json", **admin)
    assert shown.returncode == 0, shown.stderr
    return json.loads(shown.stdout)
