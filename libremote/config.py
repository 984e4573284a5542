"""Client settings, read from the environment once per connection.

=========================  =======  ===========================================================
variable                   default  meaning
=========================  =======  ===========================================================
LIBREMOTE_SERVER           (none)   daemon address, ``tcp://host:port``, or a pool's,
                                    ``etcd://h1:2379,h2:2379/NAME`` (``libremote.pool`` places the
                                    client; docs/POOL.md); also opts unmodified programs in (see
                                    ``libremote.shims.autostart``). Several daemons,
                                    comma-separated (``tcp://h1:5555,tcp://h2:5556``): one device
                                    per entry, cuda:0 on the first (see :func:`server_entries`)
LIBREMOTE_TIMEOUT          10       seconds to wait for the daemon to answer the handshake
LIBREMOTE_SYNC             0        1: every op waits for the daemon, so an error is raised on
                                    the line that caused it (like ``CUDA_LAUNCH_BLOCKING``)
LIBREMOTE_BATCH            256      commands sent per message at most while streaming
LIBREMOTE_HEARTBEAT        2        seconds between transport heartbeats; a daemon silent for
                                    three of them counts as gone
LIBREMOTE_TENANT           (none)   tenant name, for daemons with a tenants file
LIBREMOTE_TOKEN            (none)   that tenant's token (daemons without --auth-keys)
LIBREMOTE_CLIENT_KEY       (none)   this client's CURVE secret key file (``NAME.key_secret``,
                                    from ``libremote keygen client NAME``), for daemons started
                                    with --auth-keys: the key names the tenant, and the
                                    connection is authenticated and encrypted
LIBREMOTE_SERVER_KEY       (none)   the daemon's CURVE public key file (``server.key``); set
                                    both or neither (see ``libremote.curve_keys``)
LIBREMOTE_PRIORITY         normal   high, normal or low (a tenant's priority is the ceiling)
LIBREMOTE_DEVICES          1        how many of the pool's devices to ask for (cuda:0..N-1);
                                    with several addresses, the number of entries (if set, it
                                    must equal it)
LIBREMOTE_QUEUE_TIMEOUT    300      seconds to wait in the daemon's admission queue when its
                                    sessions are all taken (with a pool: in the pool-wide queue)
LIBREMOTE_MEMORY           (none)   pool only: device memory to reserve on each device, e.g. 8GiB
                                    (default: the chosen daemon's --memory-quota); the session's
                                    quota there
LIBREMOTE_MODEL            (none)   pool only: place on devices whose model contains this, e.g.
                                    H100 (case-insensitive)
LIBREMOTE_NODE             (none)   pool only: place on the daemon of this node (--node-name)
LIBREMOTE_PLACEMENT        binpack  pool only: binpack (fill a server's devices before the next)
                                    or spread (the emptiest daemon and device)
LIBREMOTE_EXCLUSIVE        0        pool only: 1 asks for a device in exclusive mode (the whole
                                    card for this one session)
LIBREMOTE_ETCD_USER        (none)   pool only: etcd credentials and TLS files, see
                                    ``libremote_wire.pool.address`` (also _PASSWORD_FILE, _CA,
                                    _CERT, _KEY)
LIBREMOTE_SPIN_US          500      microseconds a thread waiting for the daemon's answer polls
                                    without sleeping before it blocks, when the last answer came
                                    that fast (0: always block at once); see
                                    ``libremote.client.connection.Connection.receive``
LIBREMOTE_AUTO_REPLAY      0        1 (or a number N of 2 or more): a stream of commands
                                    between two sync points seen 3 (N) times alike is sent
                                    once as a template, and each later step that matches it
                                    as one RUN_STEP command; a step that diverges goes op by
                                    op (see ``libremote.client.auto_replay``). 0: off
=========================  =======  ===========================================================
"""

from __future__ import annotations

import os
from dataclasses import dataclass


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {raw!r}")
    return value


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _whole_number(name: str, default: int, minimum: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < minimum:
        raise ValueError(f"{name}={raw!r} must be a whole number, {minimum} or more")
    return int(raw)


def _auto_replay() -> int:
    """LIBREMOTE_AUTO_REPLAY as the number of alike steps before a template (0: off)."""
    raw = os.environ.get("LIBREMOTE_AUTO_REPLAY", "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return 0
    if raw in ("1", "true", "yes", "on"):
        return 3
    if not raw.isdigit():
        raise ValueError(f"LIBREMOTE_AUTO_REPLAY={raw!r}: use 0, 1, or the number of alike steps (2 or more)")
    return int(raw)


def _priority() -> str | None:
    raw = os.environ.get("LIBREMOTE_PRIORITY", "").strip().lower()
    if raw and raw not in ("high", "normal", "low"):
        raise ValueError(f"LIBREMOTE_PRIORITY={raw!r}: use high, normal or low")
    return raw or None


def server_entries(address: str | None) -> list[str]:
    """The daemon addresses in ``LIBREMOTE_SERVER`` (or ``libremote.connect``'s argument), in order.

    One address: the program's devices (``LIBREMOTE_DEVICES``, default 1) are all on that daemon,
    as they always were. Several, comma-separated: **one device per entry**, cuda:i on the i-th
    entry's daemon; an address named twice gives that daemon's session two devices (in the order
    of the entries), so ``tcp://h1:5555,tcp://h1:5555,tcp://h2:5556`` is cuda:0 and cuda:1 on h1
    and cuda:2 on h2. An entry may pin a device of its daemon, ``tcp://h1:5555#1``
    (libremote/client/servers.py). This is the shape a pool's placement produces (one
    ``address#device`` per device asked for), so a resolver can hand its result over as this list.
    """
    if not address:
        return []
    if address.strip().startswith("etcd://"):
        return [address.strip()]  # a pool's address is one entry (its members are comma-separated)
    entries = [entry.strip() for entry in address.split(",")]
    if any(not entry for entry in entries):
        raise ValueError(f"LIBREMOTE_SERVER={address!r} has an empty entry; separate addresses with single commas")
    return entries


@dataclass(frozen=True)
class Settings:
    server: str | None
    timeout_s: float
    sync: bool
    batch: int
    heartbeat_s: float
    tenant: str | None
    token: str | None
    priority: str | None
    queue_timeout_s: float
    devices: int
    spin_us: int
    client_key: str | None = None
    server_key: str | None = None
    auto_replay: int = 0
    #: Extra CURVE connections to the worker for large frames (client/stripes.py); 0: none.
    stripes: int = 0

    @classmethod
    def from_env(cls) -> Settings:
        server = os.environ.get("LIBREMOTE_SERVER", "").strip() or None
        entries = server_entries(server)
        return cls(
            server=server,
            timeout_s=_float("LIBREMOTE_TIMEOUT", 10.0),
            sync=_flag("LIBREMOTE_SYNC"),
            batch=max(1, int(_float("LIBREMOTE_BATCH", 256))),
            heartbeat_s=_float("LIBREMOTE_HEARTBEAT", 2.0),
            tenant=os.environ.get("LIBREMOTE_TENANT", "").strip() or None,
            token=os.environ.get("LIBREMOTE_TOKEN", "").strip() or None,
            priority=_priority(),
            queue_timeout_s=_float("LIBREMOTE_QUEUE_TIMEOUT", 300.0),
            devices=_whole_number("LIBREMOTE_DEVICES", len(entries) if len(entries) > 1 else 1, minimum=1),
            spin_us=_whole_number("LIBREMOTE_SPIN_US", 500, minimum=0),
            client_key=os.environ.get("LIBREMOTE_CLIENT_KEY", "").strip() or None,
            server_key=os.environ.get("LIBREMOTE_SERVER_KEY", "").strip() or None,
            auto_replay=_auto_replay(),
            stripes=min(8, _whole_number("LIBREMOTE_STRIPES", min(4, max(2, os.cpu_count() or 2)), minimum=0)),
        )
