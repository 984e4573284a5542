"""Turning the client on: what ``import libremote`` does to this process's torch.

Only client programs import ``libremote``: the daemon (``libremote_server``) and the wire
(``libremote_wire``) are packages of their own, so no daemon process ever runs this.
"""

from __future__ import annotations

active = False


def activate() -> None:
    global active
    if active:
        return
    from . import (amp, attention, cuda_api, device_map, generators, optim, parameter_identity, registration,
                   serialization, warning_location)
    from . import compile as graph_compile

    registration.register()
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
