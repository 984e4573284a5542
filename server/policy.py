"""The pool's policy: tenants, their quotas, weights and priorities, and the daemon's defaults.

Without a tenants file every client is an anonymous tenant with the defaults (``--memory-quota``,
weight 1, any priority it asks for). With ``--tenants FILE`` (TOML), a client must present a
tenant name and its token (``LIBREMOTE_TENANT``/``LIBREMOTE_TOKEN``); the tenant's priority is
the highest its clients may ask for::

    [admin]
    token = "operator-secret"          # required by `libremote admin` (see below)

    [tenants.research]
    token = "research-secret"
    memory_quota = "16GiB"             # per session
    weight = 2                         # share of device time when several sessions want it
    priority = "high"                  # high | normal | low: the ceiling for its clients
    devices = ["H100", "A100"]         # optional: device names it may be placed on
    max_sessions = 8                   # optional: sessions at once (default --max-sessions-per-tenant)

Without an admin token, admin commands are refused unless the daemon runs with
``--loopback-admin`` (then its own host may administer it). With ``--auth-keys`` (CURVE), a
client's key names its tenant and tokens are not needed: the file then only sets the tenants'
quotas, weights, priorities and devices (see ``server/auth.py``).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Any

import tomllib

from . import limits

PRIORITIES = {"low": 0, "normal": 1, "high": 2}
ANONYMOUS = "anonymous"


class PolicyError(ValueError):
    """A tenants file, client request or admin command that the policy cannot accept."""


def parse_size(text: Any) -> int:
    """``8GiB``, ``512MiB``, ``1.5GB``, a plain byte count (str or int)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    units = {"": 1, "b": 1, "k": 1 << 10, "kb": 10**3, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6,
             "mib": 1 << 20, "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tb": 10**12,
             "tib": 1 << 40}
    stripped = str(text).strip().lower()
    number = stripped.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = stripped[len(number):].strip()
    if unit not in units:
        raise PolicyError(f"unknown size unit in {text!r} (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)")
    try:
        value = int(float(number) * units[unit])
    except ValueError:
        raise PolicyError(f"not a size: {text!r}") from None
    if value <= 0:
        raise PolicyError(f"a size must be positive: {text!r}")
    return value


def parse_priority(text: Any) -> str:
    value = str(text).strip().lower()
    if value not in PRIORITIES:
        raise PolicyError(f"priority must be one of high, normal, low (got {text!r})")
    return value


def parse_weight(value: Any) -> float:
    try:
        weight = float(value)
    except (TypeError, ValueError):
        raise PolicyError(f"weight must be a number (got {value!r})") from None
    if not 0 < weight <= 1e6:
        raise PolicyError(f"weight must be positive (got {value!r})")
    return weight


@dataclass
class Tenant:
    name: str
    token: str | None
    memory_quota: int
    weight: float = 1.0
    priority: str = "normal"
    device_names: list[str] | None = None
    max_sessions: int | None = None  # None: the daemon's --max-sessions-per-tenant

    def allows_device(self, device_name: str) -> bool:
        return self.device_names is None or any(name.lower() in device_name.lower() for name in self.device_names)


@dataclass
class PoolConfig:
    default_memory_quota: int = 8 << 30
    max_sessions_per_device: int | None = limits.MAX_SESSIONS_PER_DEVICE
    #: Live tensors one session may hold (``--max-handles``).
    max_handles: int = limits.MAX_HANDLES
    placement: str = "binpack"
    #: Sessions one authenticated tenant may hold at once (``--max-sessions-per-tenant``).
    max_sessions_per_tenant: int = limits.MAX_SESSIONS_PER_TENANT
    idle_timeout_s: float | None = None
    tenants: dict[str, Tenant] = field(default_factory=dict)
    admin_token: str | None = None
    #: Oversubscription: the device budget (None: the device's own size), host RAM for spilled
    #: storages (0: no spilling), and how far quotas of admitted sessions may exceed the budget.
    device_memory: int | None = None
    host_spill: int = 0
    oversubscribe: float | None = None
    #: Replay graph-mode graphs as CUDA graphs on GPUs (server/cuda_graphs.py): "auto", "off",
    #: or "emulate" (the same rules on the CPU backend, for testing libremote itself).
    cuda_graphs: str = "auto"
    #: Compile graph-mode graphs on the daemon (server/compiled_graphs.py): "none" or "inductor".
    graph_compiler: str = "none"

    #: Tenants met without a tenants file (a CURVE key's name, or a name a client gave), kept so
    #: that an admin change to one reaches its next sessions too.
    _anonymous: dict[str, Tenant] = field(default_factory=dict)

    def _unlisted(self, name: str) -> Tenant:
        tenant = self._anonymous.get(name)
        if tenant is None:
            if len(self._anonymous) >= 4096:  # (names come from clients: bounded)
                self._anonymous.pop(next(iter(self._anonymous)))
            tenant = self._anonymous[name] = Tenant(name, None, self.default_memory_quota)
        return tenant

    @property
    def manages_residency(self) -> bool:
        return self.host_spill > 0 or self.device_memory is not None

    @property
    def has_tenants(self) -> bool:
        return bool(self.tenants)

    def tenant_named(self, name: str) -> Tenant | None:
        """The tenant of that name, for an admin change that should reach its future sessions:
        a tenants file's entry, or (without one) the defaults kept for a name seen before."""
        if self.has_tenants:
            return self.tenants.get(name)
        return self._anonymous.get(name)

    def authenticate(self, name: Any, token: Any) -> Tenant:
        """The tenant a client belongs to, or :class:`PolicyError` saying why not."""
        if not self.has_tenants:
            return self._unlisted(str(name)[:64] if name else ANONYMOUS)
        tenant = self.tenants.get(str(name)) if name else None
        if (tenant is None or tenant.token is None or not isinstance(token, str)
                or not same_secret(tenant.token, token)):
            raise PolicyError(
                "this daemon serves registered tenants only: set LIBREMOTE_TENANT and LIBREMOTE_TOKEN "
                "to a tenant name and token its operator gave you (unknown tenant or wrong token)"
            )
        return tenant

    def tenant_of_key(self, identity: Any) -> Tenant:
        """The tenant a CURVE-authenticated client belongs to: its key's name (``server/auth.py``).
        With a tenants file the name must be in it; without one it gets the defaults."""
        if identity is None or identity.kind != "tenant":
            raise PolicyError("this key is an admin key (for libremote status/admin); sessions need a tenant key")
        if not self.has_tenants:
            return self._unlisted(identity.name[:64])
        tenant = self.tenants.get(identity.name)
        if tenant is None:
            raise PolicyError(f"this client's key names tenant {identity.name!r}, which the daemon's tenants file "
                              "does not list; ask its operator to add it")
        return tenant


def same_secret(expected: str, given: str) -> bool:
    """Whether two tokens are equal, in constant time. (Compared as UTF-8 bytes:
    ``hmac.compare_digest`` raises TypeError for a str with a non-ASCII character.)"""
    return hmac.compare_digest(expected.encode("utf-8", "surrogatepass"), given.encode("utf-8", "surrogatepass"))


def load_tenants(path: str, *, tokens_required: bool = True) -> tuple[dict[str, Tenant], str | None]:
    """Read a tenants file: (tenants by name, admin token). With CURVE keys (``--auth-keys``)
    keys identify tenants, and tokens may be left out (``tokens_required=False``)."""
    try:
        with open(path, "rb") as source:
            document = tomllib.load(source)
    except OSError as exc:
        raise PolicyError(f"cannot read tenants file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"tenants file {path} is not valid TOML: {exc}") from None
    admin_token = (document.get("admin") or {}).get("token")
    tenants: dict[str, Tenant] = {}
    for name, entry in (document.get("tenants") or {}).items():
        if not isinstance(entry, dict):
            raise PolicyError(f"tenants file {path}: [tenants.{name}] must be a table")
        token = entry.get("token")
        if (tokens_required or token is not None) and (not isinstance(token, str) or not token):
            raise PolicyError(f"tenants file {path}: tenant {name!r} needs a token")
        devices = entry.get("devices")
        max_sessions = entry.get("max_sessions")
        if max_sessions is not None and not (isinstance(max_sessions, int) and not isinstance(max_sessions, bool)
                                             and max_sessions >= 1):
            raise PolicyError(f"tenants file {path}: tenant {name!r}: max_sessions must be a whole number >= 1")
        if devices is not None and not (isinstance(devices, list) and all(isinstance(d, str) for d in devices)):
            raise PolicyError(f"tenants file {path}: tenant {name!r}: devices must be a list of names")
        try:
            tenants[name] = Tenant(
                name=name,
                token=token,
                memory_quota=parse_size(entry.get("memory_quota", 8 << 30)),
                weight=parse_weight(entry.get("weight", 1.0)),
                priority=parse_priority(entry.get("priority", "normal")),
                device_names=devices,
                max_sessions=max_sessions,
            )
        except PolicyError as exc:
            raise PolicyError(f"tenants file {path}: tenant {name!r}: {exc}") from None
    if not tenants:
        raise PolicyError(f"tenants file {path} defines no [tenants.NAME] table")
    return tenants, admin_token if isinstance(admin_token, str) and admin_token else None
