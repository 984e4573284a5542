"""The layering issue 23 asks for, held by tests: the wire and the daemon's front import neither
torch nor the client, the workers import no client code, the client's modules import downward
only, and docs/PROTOCOL.md is the wire's declarations as they are now."""

from __future__ import annotations

import ast
import re
import subprocess
import sys

from conftest import REPO, subprocess_env
from helpers import program

FRONT_MODULES = ["libremote_wire", "libremote_wire.codec", "libremote_wire.messages", "libremote_wire.curve_keys",
                 "libremote_wire.zmq_events", "libremote_wire.cli", "libremote_server.cli", "libremote_server.front",
                 "libremote_server.admission", "libremote_server.workers", "libremote_server.broker",
                 "libremote_server.auth", "libremote_server.policy", "libremote_server.limits",
                 "libremote_server.peers", "libremote_server.os_limits", "libremote_server.outbox",
                 "libremote_server.worker.zygote", "libremote_server.telemetry.collect",
                 "libremote_server.telemetry.health", "libremote_server.telemetry.metrics",
                 "libremote_server.telemetry.http", "libremote_server.telemetry.logs",
                 # the pool (issue 21): the daemon's agent and what clients, daemons and the command share
                 "libremote_server.pool_agent", "libremote_wire.pool.placer", "libremote_wire.pool.reserve",
                 "libremote_wire.pool.queue", "libremote_wire.pool.placement", "libremote_wire.pool.view",
                 "libremote_wire.pool.admin", "libremote_wire.pool.status"]


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


def test_the_clients_pool_resolver_imports_no_torch_itself():
    """libremote/pool.py is loaded (lazily) only for etcd:// addresses and must stay torch-free:
    it imports the shared pool code only (the package's __init__ is what imports torch)."""
    tree = ast.parse((REPO / "libremote" / "pool.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {name for name in imported if name.split(".")[0] in ("torch", "libremote") or name.startswith(".")}


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


CLIENT = REPO / "libremote" / "client"


def _client_layer(path) -> int:
    match = re.search(r"^Layer (\d)\b", ast.get_docstring(ast.parse(path.read_text())) or "", re.MULTILINE)
    assert match, f"{path.name}: its docstring says no 'Layer N' (see libremote/client/__init__.py)"
    return int(match.group(1))


def _client_imports(path) -> set[str]:
    """The client modules ``path`` imports, at module level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names.update([node.module.split(".")[0]] if node.module else [alias.name for alias in node.names])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("libremote.client"):
            names.update([node.module.split(".")[2]] if node.module.count(".") >= 2 else
                         [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            names.update(alias.name.split(".")[2] for alias in node.names
                         if alias.name.startswith("libremote.client."))
    return names


def test_the_client_imports_from_its_own_layer_and_below_only():
    """libremote/client/ in four layers (its __init__.py): the session; remote tensors and their
    metadata; the op path; the torch-facing facade. An import from a higher layer would make a
    circle possible again, however lazily it is made."""
    modules = {path.stem: path for path in CLIENT.glob("*.py") if path.stem != "__init__"}
    layers = {name: _client_layer(path) for name, path in modules.items()}
    imports = {name: sorted(other for other in _client_imports(path) if other in modules)
               for name, path in modules.items()}
    upward = [f"{name} (layer {layers[name]}) imports {other} (layer {layers[other]})"
              for name in sorted(modules) for other in imports[name] if layers[other] > layers[name]]
    assert not upward, "\n".join(upward)
    # Nor a circle within a layer: the modules in an order where each imports only earlier ones.
    placed: list[str] = []
    while len(placed) < len(modules):
        ready = [name for name in sorted(modules) if name not in placed and set(imports[name]) <= set(placed)]
        assert ready, f"import circle among {sorted(set(modules) - set(placed))}"
        placed += ready
