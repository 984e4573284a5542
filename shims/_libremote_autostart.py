"""Env-var opt-in: ``LIBREMOTE_SERVER=tcp://host:port python unmodified.py``.

Installed as the top-level module ``_libremote_autostart`` next to ``libremote-autostart.pth``,
which Python's ``site`` runs at every interpreter start. The .pth line imports this module only
when LIBREMOTE_SERVER is set, and this module imports neither torch nor libremote: it adds a
meta-path finder that waits for the program's first ``import torch`` and activates libremote
right after torch has finished loading. A process that never imports torch pays nothing more
than this module's import.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from typing import Any


class _ActivateAfterTorch(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps torch's loader so libremote is imported once torch is."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: Any = None) -> Any:
        if fullname != "torch":
            return None
        sys.meta_path.remove(self)  # one-shot; also keeps the lookup below from recursing
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        original_exec = loader.exec_module

        def exec_module(module: Any) -> None:
            original_exec(module)
            import libremote  # noqa: F401  (activates: cuda now means the daemon's device)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    if "torch" in sys.modules:  # torch already imported (unusual at startup): activate now
        import libremote  # noqa: F401
        return
    if not any(isinstance(finder, _ActivateAfterTorch) for finder in sys.meta_path):
        sys.meta_path.insert(0, _ActivateAfterTorch())
