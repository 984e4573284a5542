"""The layering issue 23 asks for, held by tests: the wire and the daemon's front import neither
torch nor the client, the workers import no client code, and docs/PROTOCOL.md is the wire's
declarations as they are now."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO, subprocess_env
from helpers import program

FRONT_MODULES = ["libremote_wire", "libremote_wire.codec", "libremote_wire.messages", "libremote_wire.curve_keys",
                 "libremote_wire.zmq_events", "libremote_wire.cli", "libremote_server.cli", "libremote_server.front",
                 "libremote_server.admission", "libremote_server.workers", "libremote_server.broker",
                 "libremote_server.auth", "libremote_server.policy", "libremote_server.limits",
                 "libremote_server.peers", "libremote_server.os_limits", "libremote_server.outbox",
                 "libremote_server.worker.zygote"]


def _loaded_after(imports: list[str], *, block_torch: bool = False) -> set[str]:
    """The modules a fresh interpreter has loaded after importing ``imports``."""
    flags = ["--block-torch"] if block_torch else []
    result = subprocess.run([sys.executable, program("list_loaded_modules.py"), *flags, *imports], env=subprocess_env(),
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def test_the_wire_and_the_front_import_neither_torch_nor_the_client():
    loaded = _loaded_after(FRONT_MODULES, block_torch=True)
    assert not {name for name in loaded if name == "libremote" or name.startswith("libremote.")}


def test_the_workers_import_torch_but_no_client_code():
    loaded = _loaded_after(["libremote_server.worker.loop", "libremote_server.worker.session"])
    assert "torch" in loaded
    assert not {name for name in loaded if name == "libremote" or name.startswith("libremote.")}


def test_the_libremote_command_runs_without_torch(tmp_path):
    result = subprocess.run([sys.executable, program("keygen_without_torch.py"), str(tmp_path)], env=subprocess_env(),
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "research.key").exists() and (tmp_path / "research.key_secret").exists()


def test_the_protocol_reference_is_generated_from_the_declarations():
    from libremote_wire import messages

    written = (REPO / "docs" / "PROTOCOL.md").read_text()
    assert written == messages.markdown(), (
        "docs/PROTOCOL.md is stale: run `python -m libremote_wire.messages > docs/PROTOCOL.md`")
