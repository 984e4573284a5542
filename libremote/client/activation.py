"""Turning the client on (``import libremote``) and off (inside the daemon's own process).

The daemon lives in the ``libremote`` package too (``libremote.server``), so importing it runs
``libremote/__init__.py``, which activates the client. The daemon must see the real
``torch.cuda``, so ``libremote.server`` calls :func:`deactivate` first thing. The PrivateUse1
registration stays (torch cannot undo it); it is inert without the rest.
"""

from __future__ import annotations

active = False


def activate() -> None:
    global active
    if active:
        return
    from . import (amp, attention, backend, cuda_api, device_map, generators, optim, parameter_identity,
                   serialization, warning_location)
    from . import compile as graph_compile

    backend.register()
    warning_location.install()
    amp.enabled = True
    cuda_api.install()
    device_map.install()
    serialization.install()
    graph_compile.install()
    optim.install()
    attention.install()
    parameter_identity.install()
    generators.install()
    active = True


def deactivate() -> None:
    global active
    if not active:
        return
    from . import (amp, attention, cuda_api, device_map, generators, optim, parameter_identity, serialization,
                   warning_location)
    from . import compile as graph_compile

    generators.uninstall()
    parameter_identity.uninstall()
    attention.uninstall()
    optim.uninstall()
    graph_compile.uninstall()
    serialization.uninstall()
    device_map.uninstall()
    cuda_api.uninstall()
    warning_location.uninstall()
    amp.enabled = False
    active = False
