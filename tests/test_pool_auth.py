"""etcd access authenticated (issue 21): with etcd's auth enabled, a daemon given a user and
password file joins the pool, the ``libremote`` command and clients use LIBREMOTE_ETCD_USER and
LIBREMOTE_ETCD_PASSWORD_FILE, and without credentials each fails with a message saying so."""

from __future__ import annotations

import subprocess
from pathlib import Path

from etcd_cluster import make_tls
from pool_helpers import COMPUTE_CLIENT, EtcdCluster, pool_daemon, registered, wait_view

from helpers import CLIENT_TIMEOUT_S, cli, finish, last_json, spawn_client


def _etcdctl(cluster: EtcdCluster, *args: str) -> None:
    etcdctl = str(Path(cluster.binary).with_name("etcdctl"))
    done = subprocess.run([etcdctl, "--endpoints", cluster.endpoints(), *args], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, (args, done.stdout, done.stderr)


def test_pool_members_authenticate_to_etcd_with_a_user_and_password(tmp_path):
    with EtcdCluster(tmp_path) as etcd:
        _etcdctl(etcd, "user", "add", "root:rootpw")
        _etcdctl(etcd, "auth", "enable")
        password = tmp_path / "etcd-password"
        password.write_text("rootpw\n")
        address = etcd.address("secure")
        daemon = pool_daemon(address, "n1", "--etcd-user", "root", "--etcd-password-file", str(password))
        try:
            credentials = {"LIBREMOTE_ETCD_USER": "root", "LIBREMOTE_ETCD_PASSWORD_FILE": str(password)}
            refused = cli("status", "--pool", address)
            why = refused.stderr.lower()
            assert refused.returncode != 0 and ("user name is empty" in why or "permission denied" in why), refused
            for _ in range(100):
                shown = cli("status", "--pool", address, **credentials)
                if "1 daemons" in shown.stdout:
                    break
            assert shown.returncode == 0 and "1 daemons, 1 devices" in shown.stdout, shown
            wrong = tmp_path / "wrong"
            wrong.write_text("nope")
            denied = cli("status", "--pool", address, LIBREMOTE_ETCD_USER="root", LIBREMOTE_ETCD_PASSWORD_FILE=str(wrong))
            assert denied.returncode != 0 and "etcd refused user 'root'" in denied.stderr, denied
            client = spawn_client(COMPUTE_CLIENT, address, **credentials)
            out, err = finish(client, "the authenticated client did not finish", CLIENT_TIMEOUT_S)
            assert client.returncode == 0 and last_json(out)["equal"], err
        finally:
            daemon.stop()


def test_curve_tenants_are_the_same_pool_wide_and_a_reservation_under_another_tenant_is_refused(tmp_path):
    keys = tmp_path / "keys"
    for args in (["keygen", "daemon", "--dir", str(keys)], ["keygen", "client", "research", "--dir", str(tmp_path)]):
        done = cli(*args)
        assert done.returncode == 0, done
    (keys / "research.key").write_text((tmp_path / "research.key").read_text())
    curve = {"LIBREMOTE_CLIENT_KEY": str(tmp_path / "research.key_secret"),
             "LIBREMOTE_SERVER_KEY": str(keys / "server.key")}
    with EtcdCluster(tmp_path) as etcd:
        address = etcd.address("curve")
        daemons = [pool_daemon(address, node, "--auth-keys", str(keys)) for node in ("n1", "n2")]
        try:
            wait_view(address, registered("n1", "n2"), "both daemons")
            done = cli("admin", "--pool", address, "--tenant-quota", "research:devices=1")
            assert done.returncode == 0, done
            client = spawn_client(COMPUTE_CLIENT, address, **curve)
            out, err = finish(client, "the CURVE client did not finish", CLIENT_TIMEOUT_S)
            assert client.returncode == 0 and last_json(out)["equal"], err
            # Claiming another tenant's name to dodge research's quota: the daemon knows the key.
            spoof = spawn_client(COMPUTE_CLIENT, address, LIBREMOTE_TENANT="someone-else", **curve)
            out, err = finish(spoof, "the spoofing client did not finish", CLIENT_TIMEOUT_S)
            assert spoof.returncode != 0 and "tenant 'research' holds no reservation" in err, err
        finally:
            for daemon in daemons:
                daemon.stop()


def test_pool_members_speak_tls_to_etcd_with_client_certificates(tmp_path):
    tls = make_tls(tmp_path / "tls")
    with EtcdCluster(tmp_path, tls=tls) as etcd:
        address = etcd.address("tls")
        daemon = pool_daemon(address, "n1", "--etcd-ca", tls.ca, "--etcd-cert", tls.client_cert,
                             "--etcd-key", tls.client_key)
        try:
            files = {"LIBREMOTE_ETCD_CA": tls.ca, "LIBREMOTE_ETCD_CERT": tls.client_cert,
                     "LIBREMOTE_ETCD_KEY": tls.client_key}
            for _ in range(100):
                shown = cli("status", "--pool", address, **files)
                if "1 daemons" in shown.stdout:
                    break
            assert shown.returncode == 0 and "1 daemons, 1 devices" in shown.stdout, shown
            plain = cli("status", "--pool", address, "--timeout", "3")  # (no TLS: etcd does not answer plain HTTP)
            assert plain.returncode != 0 and "no etcd member" in plain.stderr, plain
            client = spawn_client(COMPUTE_CLIENT, address, **files)
            out, err = finish(client, "the TLS client did not finish", CLIENT_TIMEOUT_S)
            assert client.returncode == 0 and last_json(out)["equal"], err
        finally:
            daemon.stop()
