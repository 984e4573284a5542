"""torch's process-wide numerics switches, which a program sets for its GPU and the daemon applies.

``torch.set_float32_matmul_precision("high")`` (TF32 matmuls: several times faster fp32 on an
H100), ``torch.backends.cudnn.benchmark = True``, ``torch.use_deterministic_algorithms(True)``
and their kin change how the device computes, not what the program sends. They are global state
of the process that runs the kernels: on a GPU server shared by many clients, the daemon. So the
client reads them when it sends a batch and, when they changed, puts a SETTINGS command in front of
it; the daemon keeps each session's values and sets them in its process around that session's
work (server/numerics.py), so sessions with different settings can share a device.

One table, used by both sides: a setting's wire name, its allowed values, and how to read and set
it in this process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

_backends = torch.backends


def _deterministic() -> str:
    if not torch.are_deterministic_algorithms_enabled():
        return "off"
    return "warn" if torch.is_deterministic_algorithms_warn_only_enabled() else "on"


def _set_deterministic(value: str) -> None:
    torch.use_deterministic_algorithms(value != "off", warn_only=value == "warn")


def _attribute(owner: Any, name: str) -> tuple[Callable[[], Any], Callable[[Any], None]]:
    return (lambda: getattr(owner, name)), (lambda value: setattr(owner, name, value))


#: wire name -> (allowed values, read, set)
SETTINGS: dict[str, tuple[frozenset[Any], Callable[[], Any], Callable[[Any], None]]] = {
    "float32_matmul_precision": (frozenset({"highest", "high", "medium"}),
                                 torch.get_float32_matmul_precision, torch.set_float32_matmul_precision),
    "deterministic_algorithms": (frozenset({"off", "on", "warn"}), _deterministic, _set_deterministic),
    "cudnn_allow_tf32": (frozenset({True, False}), *_attribute(_backends.cudnn, "allow_tf32")),
    "cudnn_benchmark": (frozenset({True, False}), *_attribute(_backends.cudnn, "benchmark")),
    "cudnn_deterministic": (frozenset({True, False}), *_attribute(_backends.cudnn, "deterministic")),
    "matmul_fp16_reduced_precision_reduction": (
        frozenset({True, False}), *_attribute(_backends.cuda.matmul, "allow_fp16_reduced_precision_reduction")),
    "matmul_bf16_reduced_precision_reduction": (
        frozenset({True, False}), *_attribute(_backends.cuda.matmul, "allow_bf16_reduced_precision_reduction")),
}

_READERS = tuple(read for _, read, _ in SETTINGS.values())
_NAMES = tuple(SETTINGS)

#: torch's own C getters behind the switches: reading them all costs ~0.5 us where the public
#: attributes cost ~4 us, so the client checks these at every batch and reads the public values
#: only when they changed. (Private names: whichever this torch lacks, its public reader stands in.)
_RAW_GETTERS = tuple(getattr(torch._C, name, None) or read for name, read in (
    ("_get_float32_matmul_precision", torch.get_float32_matmul_precision),
    ("_get_deterministic_algorithms", torch.are_deterministic_algorithms_enabled),
    ("_get_deterministic_algorithms_warn_only", torch.is_deterministic_algorithms_warn_only_enabled),
    ("_get_cudnn_allow_tf32", SETTINGS["cudnn_allow_tf32"][1]),
    ("_get_cudnn_benchmark", SETTINGS["cudnn_benchmark"][1]),
    ("_get_cudnn_deterministic", SETTINGS["cudnn_deterministic"][1]),
    ("_get_cublas_allow_fp16_reduced_precision_reduction", SETTINGS["matmul_fp16_reduced_precision_reduction"][1]),
    ("_get_cublas_allow_bf16_reduced_precision_reduction", SETTINGS["matmul_bf16_reduced_precision_reduction"][1]),
))


def fingerprint() -> tuple[Any, ...]:
    """Changes whenever a value of :func:`current` does (cheap: the client reads it at every batch)."""
    return tuple([get() for get in _RAW_GETTERS])


def current() -> tuple[Any, ...]:
    """This process's values, in the order of :data:`SETTINGS`."""
    return tuple([read() for read in _READERS])


def as_wire(values: tuple[Any, ...]) -> dict[str, Any]:
    return dict(zip(_NAMES, values))


def checked(wire: Any) -> dict[str, Any]:
    """``wire`` if it names known settings with allowed values, else :class:`ValueError`."""
    if not isinstance(wire, dict):
        raise ValueError("SETTINGS takes a map of setting names to values")
    for name, value in wire.items():
        known = SETTINGS.get(name)
        if known is None:
            raise ValueError(f"unknown setting {name!r:.60}")
        if type(value) not in (str, bool) or value not in known[0]:
            raise ValueError(f"setting {name} cannot be {value!r:.60}")
    return wire


def apply(values: dict[str, Any]) -> None:
    """Set these values in this process (the daemon, around one session's work)."""
    for name, value in values.items():
        SETTINGS[name][2](value)
