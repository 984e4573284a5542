"""Turning the client on: what ``import libremote`` does to this process's torch.

Layer 4, the torch-facing facade, at its top: the one place that changes torch. In order: the
``remote`` backend is registered (:mod:`.registration`, which also connects the layers below where
a lower one cannot import an upper one); every name in :mod:`.patches`' table is replaced; then
what is no name: torch.serialization's ``cuda`` tagger and loader, the optimizers' foreach types,
and the device mode in this thread.

Only client programs import ``libremote``: the daemon (``libremote_server``) and the wire
(``libremote_wire``) are packages of their own, so no daemon process ever runs this, and nothing
turns the client off again.
"""

from __future__ import annotations

from . import device_map, optim, patches, registration, serialization

active = False


def activate() -> None:
    global active
    if active:
        return
    registration.register()
    patches.install()
    serialization.register()
    optim.register()
    device_map.enter_mode()
    active = True
