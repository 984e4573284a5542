"""The daemon's side of :mod:`libremote.numerics`: each session's values, set around its work.

torch keeps these switches per process, and the daemon's process runs every session's kernels,
so before a slice of a session's commands runs, the switches it asked for are set (only those
that differ from what is set already: sessions that keep torch's defaults cost one identity check
per slice).
"""

from __future__ import annotations

from typing import Any

from libremote_wire import numerics

#: The daemon process's own values at start: a session's until it sends SETTINGS.
DEFAULTS: dict[str, Any] = numerics.as_wire(numerics.current())
_applied: dict[str, Any] = DEFAULTS


def updated(values: dict[str, Any], wire: Any) -> dict[str, Any]:
    """A session's values after a SETTINGS command (:class:`ValueError` for a bad one)."""
    return {**values, **numerics.checked(wire)}


def switch_to(values: dict[str, Any]) -> None:
    """Make ``values`` (a session's) the process's settings."""
    global _applied
    if values is _applied:
        return
    numerics.apply({name: value for name, value in values.items() if _applied.get(name) != value})
    _applied = values


def in_effect() -> dict[str, Any]:
    """What is set in this process now (``QUERY settings``: what a session's work runs under)."""
    return numerics.as_wire(numerics.current())
