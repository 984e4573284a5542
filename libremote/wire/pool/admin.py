"""The operator's changes to a pool (``libremote admin --pool etcd://...``): tenant quotas and
devices' sharing modes, written to etcd where every client's placement reads them.

Who may run these is etcd's to say: give operators write access to ``quotas/`` and ``sharing/``
under the pool's prefix and clients only what placement needs (docs/POOL.md, "etcd users").
"""

from __future__ import annotations

import json

from . import records
from .etcd import Etcd, compare_mod_below, put_op
from .placement import parse_size
from .records import Quota
from .view import read


class AdminError(ValueError):
    """A change the pool cannot make; the message says why and what to do."""


def parse_quota(text: str) -> tuple[str, Quota]:
    """``NAME:memory=64GiB,devices=8`` (either part may be left out: no cap on it)."""
    name, colon, caps = text.partition(":")
    if not colon or not name or "/" in name:
        raise AdminError(f"--tenant-quota {text!r}: use NAME:memory=SIZE,devices=N (e.g. research:memory=64GiB,devices=8)")
    memory = devices = None
    for part in filter(None, caps.split(",")):
        key, _, value = part.partition("=")
        try:
            if key.strip() == "memory":
                memory = parse_size(value)
            elif key.strip() == "devices" and value.strip().isdigit():
                devices = int(value)
            else:
                raise ValueError(f"unknown or malformed {part!r}")
        except ValueError as exc:
            raise AdminError(f"--tenant-quota {text!r}: {exc}; use memory=SIZE and/or devices=N") from None
    if memory is None and devices is None:
        raise AdminError(f"--tenant-quota {text!r} sets no cap; use memory=SIZE and/or devices=N")
    return name, Quota(memory=memory, devices=devices)


def set_quota(etcd: Etcd, prefix: str, tenant: str, quota: Quota) -> str:
    etcd.put(records.quota_key(prefix, tenant), records.dumps(quota))
    return f"tenant {tenant!r}: pool quota set ({_caps(quota)}); new placements are held to it at once"


def remove_quota(etcd: Etcd, prefix: str, tenant: str) -> str:
    etcd.delete(records.quota_key(prefix, tenant))
    return f"tenant {tenant!r}: pool quota removed"


def set_sharing(etcd: Etcd, prefix: str, target: str, mode: str) -> str:
    """Switch device ``DAEMON_ID/INDEX`` to ``mode`` (exclusive or shared), only while no
    reservation holds it (checked in the same transaction that switches it)."""
    daemon_id, slash, index = target.rpartition("/")
    if not slash or not index.isdigit():
        raise AdminError(f"{target!r}: name a device as DAEMON/INDEX, e.g. gpu01:7777/0 (see libremote status --pool)")
    view = read(etcd, prefix)
    daemon = next((d for d in view.daemons if d.id == daemon_id), None)
    if daemon is None or int(index) not in {device.index for device in daemon.devices}:
        raise AdminError(f"the pool has no device {target} (registered: {', '.join(sorted(d.id for d in view.daemons))})")
    held = view.load().get((daemon_id, int(index)))
    if held is not None and held.sessions:
        raise AdminError(f"device {target} holds {held.sessions} placement(s): switch it when it is empty (drain "
                         "it, or wait for its sessions to end)")
    switched, _ = etcd.txn([compare_mod_below(records.device_reservations(prefix, daemon_id, int(index)), view.revision)],
                           [put_op(records.sharing_key(prefix, daemon_id, int(index)), json.dumps(mode))])
    if not switched:
        raise AdminError(f"a client was placed on {target} meanwhile: switch it when it is empty")
    return f"device {target} is {mode} now"


def _caps(quota: Quota) -> str:
    parts = []
    if quota.memory is not None:
        parts.append(f"memory {quota.memory} bytes")
    if quota.devices is not None:
        parts.append(f"{quota.devices} devices")
    return ", ".join(parts)
