"""Which device the daemon executes on, and the facts about it that clients are shown.

``--device auto`` takes the first kind of accelerator this torch has (CUDA, ROCm as CUDA, XPU,
MPS), falling back to the CPU. It does not ask ``torch.accelerator``: that prefers a registered
PrivateUse1 backend over everything else, and libremote's own client registers one (the daemon
lives in the ``libremote`` package, so that registration has happened in the daemon's process
too and cannot be undone), so ``torch.accelerator`` would name the client's remote device.

On the CPU backend (CI, laptops) the daemon is fully functional; only the device facts differ.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..host import host_memory_info, host_memory_total

#: The accelerator kinds ``--device auto`` looks for, in order (each a ``torch.<kind>`` module).
_AUTO_KINDS = ("cuda", "xpu", "mps")


def _local_accelerators() -> list[torch.device]:
    """Every device of the first accelerator kind this machine has, else ``[cpu]``."""
    for kind in _AUTO_KINDS:
        module = getattr(torch, kind, None)
        if module is not None and module.is_available():
            count = module.device_count() if hasattr(module, "device_count") else 1
            if count > 0:
                return [torch.device(kind, index) for index in range(count)]
    return [torch.device("cpu")]


def resolve_device(spec: str) -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N|<accelerator>[:N]`` into a device torch can use, or explain."""
    spec = spec.strip().lower()
    if spec == "auto":
        return _local_accelerators()[0]
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ValueError(f"--device {spec!r} is not a device torch knows: {exc}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    module = getattr(torch, device.type, None)
    if module is None or not module.is_available():
        raise ValueError(
            f"--device {spec}: this torch ({torch.__version__}) sees no {device.type} device; "
            "use --device cpu or --device auto"
        )
    index = 0 if device.index is None else device.index
    count = module.device_count()
    if index >= count:
        raise ValueError(f"--device {spec}: only {count} {device.type} device(s) are visible")
    return torch.device(device.type, index)


def resolve_devices(spec: str) -> list[torch.device]:
    """The pool for ``--device``: ``auto`` is every accelerator torch sees (else the CPU); a
    comma-separated list names devices one by one (``cpu,cpu`` is two CPU-backed devices)."""
    spec = spec.strip().lower()
    if spec == "auto":
        return _local_accelerators()
    found = [resolve_device(part) for part in spec.split(",") if part.strip()]
    if not found:
        raise ValueError("--device names no device")
    accelerators = [device for device in found if device.type != "cpu"]
    if len(set(accelerators)) != len(accelerators):
        raise ValueError(f"--device {spec}: an accelerator is named twice")
    return found


@dataclass(frozen=True)
class DeviceFacts:
    """What ``torch.cuda.get_device_properties`` shows on the client."""

    name: str
    type: str
    total_memory: int
    major: int
    minor: int
    multi_processor_count: int
    bf16_supported: bool

    def to_wire(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "total_memory": self.total_memory,
            "major": self.major,
            "minor": self.minor,
            "multi_processor_count": self.multi_processor_count,
            "bf16_supported": self.bf16_supported,
        }


def describe(device: torch.device) -> DeviceFacts:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return DeviceFacts(
            name=props.name,
            type="cuda",
            total_memory=props.total_memory,
            major=props.major,
            minor=props.minor,
            multi_processor_count=props.multi_processor_count,
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    if device.type == "cpu":
        cpu = platform.processor() or platform.machine() or "cpu"
        return DeviceFacts(
            name=f"libremote CPU backend ({cpu}, {os.cpu_count()} cores)",
            type="cpu",
            total_memory=host_memory_total(),
            major=0,
            minor=0,
            multi_processor_count=os.cpu_count() or 1,
            bf16_supported=True,
        )
    return DeviceFacts(
        name=str(device), type=device.type, total_memory=0, major=0, minor=0,
        multi_processor_count=0, bf16_supported=True,
    )


def hardware_id(device: torch.device) -> dict[str, Any]:
    """What finds the device in NVML whatever CUDA_VISIBLE_DEVICES says (the front's health
    sampler, server/telemetry/health.py): its UUID. Not part of the facts clients see."""
    if device.type != "cuda":
        return {}
    try:
        uuid = str(torch.cuda.get_device_properties(device).uuid)
    except (AttributeError, RuntimeError):
        return {}
    return {"uuid": uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"}


def synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


# torch.cuda.Event and torch.cuda.Stream, seen through typed constructors: torch leaves the
# ``__new__`` of each unannotated, and strict mypy refuses to call an unannotated function from
# typed code (no-untyped-call). These are the classes themselves, called the same way.
_new_event: Callable[..., torch.cuda.Event] = torch.cuda.Event
_new_stream: Callable[..., torch.cuda.Stream] = torch.cuda.Stream


def timing_event() -> torch.cuda.Event:
    """``torch.cuda.Event(enable_timing=True)``."""
    return _new_event(enable_timing=True)


def cuda_stream(device: torch.device) -> torch.cuda.Stream:
    """``torch.cuda.Stream(device)``: a new stream on ``device``."""
    return _new_stream(device)


def event_done(event: torch.cuda.Event) -> bool:
    """``event.query()`` (unannotated in torch too): whether the work it follows has completed."""
    query: Callable[[], bool] = event.query
    return query()


def default_generator(device: torch.device) -> torch.Generator:
    """The generator that ops without a ``generator`` argument (native_dropout) draw from."""
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index or 0]
    module = getattr(torch, device.type)  # torch.xpu, torch.mps, ...
    generator: torch.Generator = module.default_generators[device.index or 0]
    return generator


def memory_info(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of the device; for the CPU backend, of the host."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)
    return host_memory_info()
