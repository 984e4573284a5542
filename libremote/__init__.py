"""libremote: use GPUs that sit in other servers from PyTorch programs on CPU-only hosts.

``import libremote`` makes ``cuda`` mean a GPU on a libremote daemon: tensors and modules moved to
``cuda`` live there, ops on them run there, and only what the program reads comes back. The
daemon's address comes from ``LIBREMOTE_SERVER=tcp://host:port`` or :func:`connect`; the session
opens on first use.

Public API: :func:`connect`, :func:`disconnect`, :func:`is_connected`, :func:`synchronize`,
:func:`server_info`, :func:`memory_stats` and the exceptions in :mod:`libremote.errors`.
"""

from __future__ import annotations

import contextlib as _contextlib
from collections.abc import Iterator
from typing import Any

from libremote_wire import __version__  # (one version for the client, the wire and the daemon)

from .client import activation as _activation
from .errors import (
    CaptureError,
    ConnectionFailed,
    LibremoteError,
    NotConfiguredError,
    RemoteOpError,
    RemoteOutOfMemoryError,
)

_activation.activate()


def connect(address: str | None = None) -> dict[str, Any]:
    """Open a session with the daemon at ``address`` (default: ``LIBREMOTE_SERVER``).

    Several comma-separated addresses (``"tcp://h1:5555,tcp://h2:5556"``) open one session per
    daemon, one device per entry: cuda:0 on the first, and so on (README, "One program on several
    servers"; set ``LIBREMOTE_DEVICES`` to their number before the program starts).

    Closes the current session(s) first (their tensors become unusable). Returns what the daemon
    said about itself (with several: the current device's daemon): versions, session id, devices.
    Raises :class:`ConnectionFailed` within ``LIBREMOTE_TIMEOUT`` seconds if a daemon does not
    answer, naming it.
    """
    from .client import runtime

    return dict(runtime.connect(address).daemon_info)


def disconnect() -> None:
    """Close the session; the daemon frees its memory at once."""
    from .client import runtime

    runtime.disconnect()


def is_connected() -> bool:
    from .client import runtime

    sessions = runtime.sessions()  # (one per daemon: all of them must be up)
    return bool(sessions) and all(not session.closed and not session.connection.broken for session in sessions)


def synchronize() -> None:
    """Wait until the daemon (every daemon of the program) has run every op sent so far (raises a
    pending remote error)."""
    from .client import runtime

    runtime.current()
    for session in runtime.sessions():
        session.synchronize()


def server_info() -> dict[str, Any]:
    """The daemon's self-description from the handshake (connects if needed)."""
    from .client import runtime

    return dict(runtime.current().daemon_info)


@_contextlib.contextmanager
def op_trace() -> Iterator[list[str]]:
    """Record the schema name of every op sent to the daemon inside the ``with`` block.

    ``with libremote.op_trace() as ops: model(x)`` leaves e.g. ``["aten::addmm", ...]`` in
    ``ops``: what the daemon executes for that code, after autograd and decompositions.
    """
    from .client import runtime

    session = runtime.current()
    names: list[str] = []
    previous, session.op_log = session.op_log, names
    try:
        yield names
    finally:
        session.op_log = previous


def session_stats() -> dict[str, Any]:
    """What the daemon did for this session: ops executed, batches, seconds spent executing, and
    on a GPU how many graph-mode graphs it captured and replayed as CUDA graphs. With
    ``LIBREMOTE_AUTO_REPLAY``, also this client's repeated steps: ``auto_replay_steps`` (sent as
    one RUN_STEP), ``auto_replay_op_by_op`` (sent command by command), ``auto_replay_templates``,
    ``auto_replay_fallbacks`` (steps that diverged from a template, or could not be held back),
    their reasons, and ``auto_replay_last_fallback`` (why the last one did). The stats query is
    a sync point itself: the step it ends counts too."""
    from libremote_wire.messages import Cmd

    from .client import runtime

    session = runtime.current()
    result, _ = session.request([Cmd.QUERY, "stats"])
    stats = dict(result)
    if session.steps is not None:  # LIBREMOTE_AUTO_REPLAY: what this client sent as repeated steps
        counts = session.steps.stats
        stats.update(auto_replay_steps=counts.replayed, auto_replay_op_by_op=counts.op_by_op,
                     auto_replay_templates=counts.templates, auto_replay_fallbacks=counts.fallbacks,
                     auto_replay_fallback_reasons=dict(counts.reasons),
                     auto_replay_last_fallback=counts.last_fallback)
    return stats


def capture_step(fn: Any, *example_inputs: Any, warmup: int = 1) -> Any:
    """Record a training step once; calling the result replays it on the daemon with one command.

    ``step = libremote.capture_step(train_step, x, y)`` then ``loss = step(x, y)`` per batch.
    The contract is CUDA graphs' (static inputs and outputs, no sync inside, ``capturable=True``
    optimizers); see :mod:`libremote.client.capture`.
    """
    from .client.capture import capture_step as _capture_step

    return _capture_step(fn, *example_inputs, warmup=warmup)


def memory_stats() -> dict[str, int]:
    """This session's memory on the daemon: allocated, peak, reserved, device free/total."""
    from .client import cuda_api

    return cuda_api._memory()


__all__ = [
    "CaptureError",
    "ConnectionFailed",
    "LibremoteError",
    "NotConfiguredError",
    "RemoteOpError",
    "RemoteOutOfMemoryError",
    "__version__",
    "capture_step",
    "connect",
    "disconnect",
    "is_connected",
    "memory_stats",
    "op_trace",
    "server_info",
    "session_stats",
    "synchronize",
]
