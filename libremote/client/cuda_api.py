"""``torch.cuda`` and ``torch.accelerator`` answered by the daemon.

Layer 4, the torch-facing facade: :mod:`.patches` puts these in ``torch.cuda`` and
``torch.accelerator``.

On a CPU build of torch these functions say there is no GPU (or raise). In their place they
describe the daemon's device: properties and memory figures are the daemon's real ones, seeding
seeds the session's generator on the daemon, and ``synchronize`` waits for the daemon's device.
Streams and events are minimal but real: a session has one stream on the daemon, so ordering
between streams always holds; events record timestamps on the daemon for ``elapsed_time``.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import threading
from collections.abc import Iterator
from typing import Any

import torch

from libremote_wire.messages import Cmd

from ..errors import ConnectionFailed, NotConfiguredError
from . import capture, runtime, warning_location
from .runtime import current_device
from .runtime import device_facts as _facts
from .runtime import device_index as _index

_warned: set[str] = set()


def _session() -> Any:
    return runtime.current()


# ------------------------------------------------------------------------------------------------
# Availability and devices
# ------------------------------------------------------------------------------------------------
def is_available() -> bool:
    try:
        _session()
    except NotConfiguredError as exc:
        _warn_once("not configured", str(exc))
        return False
    except ConnectionFailed as exc:
        _warn_once("unreachable", str(exc))
        return False
    return True


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warning_location.warn(message, RuntimeWarning)


def device_count() -> int:
    """Every device of the program, on all its daemons (libremote/client/servers.py)."""
    return len(runtime.devices()) if is_available() else 0


# (Which device is current, ``current_device``/``set_device``, is process-wide state: runtime.py.)


def synchronize(device: Any = None) -> None:
    """Wait for ``device``'s daemon; without one, for every daemon of the program."""
    if device is not None:
        runtime.session_for(_index(device)).synchronize()
        return
    _session()
    for session in runtime.sessions():
        session.synchronize()


def _of(device: Any) -> Any:
    """The session of ``device`` (None: the current one)."""
    return runtime.session_for(_index(device))


def is_initialized() -> bool:
    return runtime.current_if_open() is not None


def init() -> None:
    _session()


class DeviceProperties:
    """What ``torch.cuda.get_device_properties`` returns for a remote device."""

    def __init__(self, facts: dict[str, Any]) -> None:
        self.name: str = facts["name"]
        self.total_memory: int = facts["total_memory"]
        self.major: int = facts["major"]
        self.minor: int = facts["minor"]
        self.multi_processor_count: int = facts["multi_processor_count"]
        self.is_integrated = False
        self.is_multi_gpu_board = False
        self.backend_type: str = facts["type"]

    def __repr__(self) -> str:
        return (
            f"_CudaDeviceProperties(name='{self.name}', major={self.major}, minor={self.minor}, "
            f"total_memory={self.total_memory // (1 << 20)}MB, "
            f"multi_processor_count={self.multi_processor_count}, backend='{self.backend_type}' via libremote)"
        )


def get_device_properties(device: Any = None) -> DeviceProperties:
    return DeviceProperties(_facts(device))


def get_device_name(device: Any = None) -> str:
    return _facts(device)["name"]


def get_device_capability(device: Any = None) -> tuple[int, int]:
    facts = _facts(device)
    return facts["major"], facts["minor"]


def is_bf16_supported(including_emulation: bool = True) -> bool:
    return bool(_facts().get("bf16_supported", True))


# ------------------------------------------------------------------------------------------------
# Random numbers: the session's generator on the daemon
# ------------------------------------------------------------------------------------------------
_initial_seed: int | None = None


def _seed(seed: int, device: int | None) -> None:
    global _initial_seed
    seed = int(seed)
    _initial_seed = seed
    if runtime.configured_address() is None and runtime.current_if_open() is None:
        return  # torch.manual_seed() calls this too; without a daemon there is nothing to seed
    if device is None:
        _session()
        for session in runtime.sessions():
            session.submit([Cmd.SEED, seed])
    else:
        session = _of(device)
        session.submit([Cmd.SEED, seed, session.local_device(device)])


def manual_seed(seed: int) -> None:
    """Seed the current device's generator on the daemon."""
    _seed(seed, current_device())


def manual_seed_all(seed: int) -> None:
    """Seed every device's generator of this session on the daemon."""
    _seed(seed, None)


def seed() -> None:
    manual_seed(random.getrandbits(63))


seed_all = seed


def initial_seed() -> int:
    if _initial_seed is None:
        seed()
    assert _initial_seed is not None
    return _initial_seed


def get_rng_state(device: Any = "cuda") -> torch.Tensor:
    session = _of(device)
    state, _ = session.request([Cmd.RNG_STATE, session.local_device(_index(device))])
    return torch.frombuffer(bytearray(state), dtype=torch.uint8)


def set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
    data = bytes(new_state.detach().cpu().contiguous().view(torch.uint8).numpy())
    session = _of(device)
    session.request([Cmd.RNG_STATE, session.local_device(_index(device)), data])


def get_rng_state_all() -> list[torch.Tensor]:
    return [get_rng_state(index) for index in range(device_count())]


def set_rng_state_all(new_states: list[torch.Tensor]) -> None:
    for index, state in enumerate(new_states):
        set_rng_state(state, index)


# ------------------------------------------------------------------------------------------------
# Memory: this session's figures on the daemon
# ------------------------------------------------------------------------------------------------
def _memory(device: Any = None) -> dict[str, int]:
    """The figures of ``device``'s session (a session's devices share them: one daemon's account)."""
    result, _ = _of(device).request([Cmd.QUERY, "memory"])
    return result


def memory_allocated(device: Any = None) -> int:
    return _memory(device)["allocated"]


def max_memory_allocated(device: Any = None) -> int:
    return _memory(device)["peak"]


def memory_reserved(device: Any = None) -> int:
    return _memory(device)["reserved"]


def max_memory_reserved(device: Any = None) -> int:
    stats = _memory(device)
    return max(stats["reserved"], stats["peak"])


def reset_peak_memory_stats(device: Any = None) -> None:
    _of(device).request([Cmd.QUERY, "reset_peak_memory"])


reset_max_memory_allocated = reset_peak_memory_stats


def empty_cache() -> None:
    for session in runtime.sessions():
        session.request([Cmd.QUERY, "empty_cache"])


def set_per_process_memory_fraction(fraction: float, device: Any = None) -> None:
    """Cap this session at ``fraction`` of its device's memory: allocations beyond it raise
    ``torch.OutOfMemoryError`` as CUDA's would. The cap only lowers the operator's quota."""
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool):
        raise TypeError("Invalid type for fraction argument, must be `float`")
    if not 0 <= fraction <= 1:
        raise ValueError(f"Invalid fraction value: {fraction}. Allowed range: 0~1")
    _of(device).request([Cmd.QUERY, "memory_fraction", float(fraction)])


def mem_get_info(device: Any = None) -> tuple[int, int]:
    stats = _memory(device)
    return stats["device_free"], stats["device_total"]


#: A pool's figures as the daemon reports them (server/memory.py PoolStats): bytes now, at the
#: peak, allocated and freed over the session's life; then the same for storage counts.
_POOL_FIELDS = ("bytes", "peak_bytes", "allocated_bytes", "freed_bytes", "count", "peak_count", "allocations", "frees")


def memory_stats(device: Any = None) -> dict[str, int]:
    """The keys of CUDA's caching-allocator statistics (``torch.cuda.memory_summary`` reads them
    all), from this session's storages on the daemon: each storage counts as one allocation and
    one segment of the pool CUDA would serve it from (small: up to 1 MiB). The daemon does not
    split or cache blocks for a session, so allocated, active, requested and reserved coincide
    but for what the daemon's device allocator holds beyond it (``reserved_bytes.all.current``)."""
    stats = _memory(device)
    pools = stats.get("pools") or {}  # (an older daemon sends no pools)
    large, small = pools.get("large", {}), pools.get("small", {})
    every = {field: large.get(field, 0) + small.get(field, 0) for field in _POOL_FIELDS}
    every["peak_bytes"] = stats["peak"]  # the peak of the sum, not the sum of the peaks
    every["peak_count"] = stats.get("peak_storages", every["peak_count"])
    result: dict[str, int] = {}
    for pool_name, figures in (("all", every), ("large_pool", large), ("small_pool", small)):
        for metric, unit in (("allocated_bytes", "bytes"), ("active_bytes", "bytes"), ("requested_bytes", "bytes"),
                             ("reserved_bytes", "bytes"), ("allocation", "count"), ("active", "count"),
                             ("segment", "count")):
            fields = _POOL_FIELDS[:4] if unit == "bytes" else _POOL_FIELDS[4:]
            for stat, field in zip(("current", "peak", "allocated", "freed"), fields):
                result[f"{metric}.{pool_name}.{stat}"] = figures.get(field, 0)
        for metric in ("inactive_split_bytes", "inactive_split"):
            for stat in ("current", "peak", "allocated", "freed"):
                result[f"{metric}.{pool_name}.{stat}"] = 0
    result["reserved_bytes.all.current"] = stats["reserved"]
    result["reserved_bytes.all.peak"] = max(stats["reserved"], stats["peak"])
    for metric in ("oversize_allocations", "oversize_segments"):
        for stat in ("current", "peak", "allocated", "freed"):
            result[f"{metric}.{stat}"] = 0
    result.update(num_alloc_retries=0, num_ooms=0, num_sync_all_streams=0, num_device_alloc=every["allocations"],
                  num_device_free=every["frees"], max_split_size=-1)
    return dict(sorted(result.items()))


# ------------------------------------------------------------------------------------------------
# Streams and events
# ------------------------------------------------------------------------------------------------
class Stream:
    """A remote stream. The daemon runs a session's work in order on one stream, so waits
    between streams are already satisfied; ``synchronize``/``query`` wait for the daemon."""

    def __init__(self, device: Any = None, priority: int = 0, **kwargs: Any) -> None:
        self.device = torch.device("cuda", _index(device))
        self.priority = priority
        self.cuda_stream = 0

    def synchronize(self) -> None:
        synchronize()

    def query(self) -> bool:
        synchronize()
        return True

    def wait_stream(self, stream: Stream) -> None:
        pass

    def is_capturing(self) -> bool:
        """True while ``libremote.capture_step`` records (optimizers check this, see capture.py)."""
        return capture.is_capturing()

    def wait_event(self, event: Event) -> None:
        pass

    def record_event(self, event: Event | None = None) -> Event:
        event = event or Event()
        event.record(self)
        return event

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Stream) and other.device == self.device

    def __hash__(self) -> int:
        return hash(("libremote.Stream", self.device))

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        return None

    def __repr__(self) -> str:
        return f"<libremote Stream device={self.device}>"


_event_ids = itertools.count(1)


class Event:
    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False, **kwargs: Any) -> None:
        self.enable_timing = enable_timing
        self._id = next(_event_ids)
        self._recorded = False

    def record(self, stream: Stream | None = None) -> None:
        _session().submit([Cmd.EVENT, self._id])
        self._recorded = True

    def wait(self, stream: Stream | None = None) -> None:
        pass

    def query(self) -> bool:
        synchronize()
        return True

    def synchronize(self) -> None:
        synchronize()

    def elapsed_time(self, end_event: Event) -> float:
        if not (self._recorded and end_event._recorded):
            raise RuntimeError("Both events must be recorded before calculating elapsed time.")
        value, _ = _session().request([Cmd.ELAPSED, self._id, end_event._id])
        return float(value)


def current_stream(device: Any = None) -> Stream:
    return Stream(device)


default_stream = current_stream


def set_stream(stream: Stream) -> None:
    pass


@contextlib.contextmanager
def stream(stream: Stream | None = None) -> Iterator[Stream | None]:
    yield stream


# ------------------------------------------------------------------------------------------------
# What else torch.cuda holds for a GPU that the client does not have
# ------------------------------------------------------------------------------------------------
def _lazy_init() -> None:
    """``torch.cuda._lazy_init``: nothing to initialise here; the session opens on first use."""


def ipc_collect() -> None:
    """``torch.cuda.ipc_collect``: no memory is shared between processes through CUDA IPC here."""


class _NoNVTX:
    """NVTX ranges (``torch.cuda.nvtx.range_push`` and friends, common in profiled code) annotate
    a local GPU profiler's timeline: with no local GPU there is nothing to annotate, so they are
    accepted and kept track of (push/pop return depths as NVTX does) instead of raising, as a
    CPU build of torch otherwise does. A client whose torch has real NVTX keeps its own."""

    def __init__(self) -> None:
        self._depth = threading.local()
        self._next_range = itertools.count(1).__next__

    def rangePushA(self, message: str) -> int:
        depth = getattr(self._depth, "value", 0)
        self._depth.value = depth + 1
        return depth

    def rangePop(self) -> int:
        depth = getattr(self._depth, "value", 0) - 1
        self._depth.value = max(depth, 0)
        return depth

    def rangeStartA(self, message: str) -> int:
        return self._next_range()

    def rangeEnd(self, range_id: int) -> None:
        pass

    def markA(self, message: str) -> None:
        pass

    def deviceRangeStart(self, message: str, stream: int = 0) -> object:
        return object()

    def deviceRangeEnd(self, range_handle: object, stream: int = 0) -> None:
        pass


_original_cudnn_is_acceptable = torch.backends.cudnn.is_acceptable


def _cudnn_is_acceptable(tensor: torch.Tensor) -> bool:
    """cuDNN is the daemon's business: client code (nn.RNN's weight flattening) must not try it."""
    if tensor.device.type == "cuda":
        return False
    return _original_cudnn_is_acceptable(tensor)


def _current_accelerator(check_available: bool = False) -> torch.device | None:
    return torch.device("cuda") if not check_available or is_available() else None
