"""The commands of a session that are not ops or graphs: host data (UPLOAD, PUT, FETCH), FREE,
SYNC, random number generators (SEED, RNG_STATE, GENERATOR), timing events (EVENT, ELAPSED),
QUERY and SETTINGS, and the figures a session reports.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from libremote_wire import codec, torch_codec
from libremote_wire.codec import GeneratorRef
from libremote_wire.messages import ErrorKind

from .. import limits
from . import devices, layouts, numerics, op_policy, values
from .errors import CommandError
from .memory import PoolStats
from .residency import SpillExhausted

if TYPE_CHECKING:
    import collections

    from . import programs
    from .compiled_graphs import GraphCompiler
    from .cuda_graphs import GraphCapture
    from .memory import MemoryAccount
    from .residency import DeviceMemory, StorageRecord

log = logging.getLogger("libremote.server")

#: Timing events a session may have recorded (EVENT); the oldest are forgotten beyond it.
MAX_EVENTS = 4096


class CommandsMixin:
    """Host data, generators, events and queries for :class:`~.session.Session`.

    A mixin: state lives on the session. The session's state and the methods of the session and
    its other mixins that these handlers use are declared below for the type checker only
    (``if TYPE_CHECKING``): they name what this mixin relies on, and mypy checks that Session
    defines each with the same type, while at run time the class body holds none of them, so
    nothing here shadows the real ones through the MRO.
    """

    if TYPE_CHECKING:
        # Session state (session.py).
        devices: list[torch.device]
        device_memories: list[DeviceMemory | None]
        memory: MemoryAccount
        stream: torch.cuda.Stream | None
        generators: list[torch.Generator]
        explicit_generators: dict[int, torch.Generator]
        numerics: dict[str, Any]
        tensors: dict[int, torch.Tensor]
        _events: collections.OrderedDict[int, Any]
        _graph_pool: dict[int, int]
        _freed_in_graph_pool: set[int]
        _program_at: tuple[programs.Program, int] | None
        _last_in_batch: bool
        _cuda_graphs: GraphCapture | None
        _compiler: GraphCompiler | None
        ops_executed: int
        batches: int
        busy_s: float
        host_s: float
        bytes_in: int
        bytes_out: int
        errors: dict[str, int]
        graphs_defined: int
        graph_runs: int
        step_replays: int
        bytes_exported: int
        bytes_pulled: int

        @property
        def device(self) -> torch.device: ...

        # Session's methods (session.py).
        def tensor(self, handle: int) -> torch.Tensor: ...
        def _store(self, handle: Any, tensor: Any) -> None: ...
        def _drop(self, handle: int) -> None: ...
        def _device(self, index: Any) -> torch.device: ...
        def _index_of(self, device: torch.device | None) -> int: ...
        def set_memory_fraction(self, fraction: Any) -> None: ...

        # QuotaMixin's (session_quota.py).
        def _over_quota(self, extra: int = 0) -> bool: ...
        def _quota_message(self, in_use: int, needed: int) -> str: ...

        # ResidencyMixin's (session_residency.py).
        def _make_resident(self, what: str, tensors: list[torch.Tensor]) -> list[StorageRecord]: ...
        def _fit_on_device(self, what: str, inputs: list[StorageRecord], outs: Any) -> None: ...

    # ------------------------------------------------------------------------------------------
    # Command handlers: host data, frees, RNG, events and queries
    # ------------------------------------------------------------------------------------------
    def _upload(self, command: list[Any], frames: list[Any]) -> None:
        codec.check(len(command) == 5, "UPLOAD takes [UPLOAD, dst, dtype, shape, frame]")
        _, handle, dtype, shape, index = command
        codec.check(isinstance(dtype, torch.dtype) and isinstance(shape, list), "UPLOAD needs a dtype and a shape")
        codec.check(isinstance(index, int) and 1 <= index < len(frames) + 1, "UPLOAD names a missing frame")
        source = torch_codec.tensor_from_bytes(frames[index - 1], dtype, shape)
        destination = self.tensor(handle)
        if self.memory.managed:
            self._make_resident("upload", [destination])
        destination.copy_(source)

    def _put(self, command: list[Any], frames: list[Any]) -> None:
        codec.check(len(command) == 7, "PUT takes [PUT, new, dtype, shape, stride, device, frame]")
        _, handle, dtype, shape, stride, device_index, index = command
        device = self._device(device_index)
        codec.check(isinstance(dtype, torch.dtype) and isinstance(shape, list) and isinstance(stride, list),
                       "PUT needs a dtype, a shape and strides")
        codec.check(isinstance(index, int) and 1 <= index < len(frames) + 1, "PUT names a missing frame")
        codec.check(layouts.is_dense_layout(shape, stride), lambda: f"PUT strides {stride} do not lay out {shape} densely")
        source = torch_codec.tensor_from_bytes(frames[index - 1], dtype, shape)
        if self._over_quota(source.nbytes):
            raise CommandError(ErrorKind.OOM, "upload", self._quota_message(self.memory.allocated, source.nbytes))
        # Always a copy into memory torch owns: a tensor over the frame's buffer could never be
        # resized (resize_, out= arguments). Receiving straight into torch-owned (pinned, on a
        # GPU server) buffers is the way to drop this copy.
        device_memory = self.device_memories[self._index_of(device)] if self.memory.managed else None
        if device_memory is None:
            tensor = torch.empty_strided(shape, stride, dtype=dtype, device=device)
        else:
            try:
                tensor = device_memory.retrying_oom(
                    lambda: torch.empty_strided(shape, stride, dtype=dtype, device=device))
            except SpillExhausted as exc:
                raise CommandError(ErrorKind.OOM, "upload", str(exc)) from None
        tensor.copy_(source)
        self._store(handle, tensor)
        if self.memory.managed:
            self._fit_on_device("upload", [], [handle])

    def _fetch(self, command: list[Any], frames: list[Any]) -> tuple[list[Any], Any]:
        codec.check(len(command) == 2, "FETCH takes [FETCH, handle]")
        tensor = self.tensor(command[1])
        if tensor.layout is not torch.strided:
            raise CommandError(ErrorKind.OP, "FETCH", f"handle {command[1]} is a {tensor.layout} tensor: fetch its "
                               "indices and values (strided tensors) instead")
        if self.memory.managed:
            self._make_resident("FETCH", [tensor])
        if (self.device.type == "cpu" and self._last_in_batch and not self.memory.managed
                and not tensor.is_conj() and not tensor.is_neg() and layouts.is_dense(tensor, any_offset=True)):
            # ZeroMQ sends the bytes after this returns. Nothing of this session runs before its
            # client has the whole reply (FETCH ends the batch, and the client sends nothing
            # while it waits), and no other session can name this tensor: no copy needed. (Not
            # with oversubscription: another session's work may spill the storage meanwhile.)
            host = tensor
        else:
            # A fresh host copy (preserve_format keeps the strides of dense tensors).
            host = tensor.to("cpu", copy=True)
            if not layouts.is_dense(host):
                host = host.contiguous()
        numel = host.numel()
        flat = host.as_strided((numel,), (1,), host.storage_offset()) if numel else host.reshape(-1)
        meta = [torch_codec.dtype_ext(host.dtype), list(host.shape), list(host.stride())]
        return meta, torch_codec.tensor_bytes(flat)

    def _free(self, command: list[Any], frames: list[Any]) -> None:
        codec.check(len(command) == 2 and isinstance(command[1], list), "FREE takes [FREE, [handles]]")
        graph_pool = self._graph_pool
        for handle in command[1]:
            if isinstance(handle, int):
                if graph_pool and handle in graph_pool and self._program_at is None:
                    self._freed_in_graph_pool.add(handle)  # the step still uses it: see _define_program
                else:
                    self._drop(handle)

    def _settings(self, command: list[Any], frames: list[Any]) -> None:
        codec.check(len(command) == 2, "SETTINGS takes [SETTINGS, {name: value}]")
        try:
            self.numerics = numerics.updated(self.numerics, command[1])
        except ValueError as exc:
            raise CommandError(ErrorKind.REFUSED, "settings", str(exc)) from None
        numerics.switch_to(self.numerics)  # for the rest of this slice too

    def _sync(self, command: list[Any], frames: list[Any]) -> None:
        if self.stream is not None:
            self.stream.synchronize()  # this session's work only, not other tenants'
        else:
            for device in set(self.devices):
                devices.synchronize(device)
        return None

    def _seed(self, command: list[Any], frames: list[Any]) -> None:
        codec.check(len(command) in (2, 3) and isinstance(command[1], int), "SEED takes [SEED, int, device?]")
        if len(command) == 2:
            chosen = self.generators
        elif type(command[2]) is GeneratorRef:
            chosen = [self._explicit_generator(command[2])]
        else:
            chosen = [self.generators[self._index_of(self._device(command[2]))]]
        for generator in chosen:
            generator.manual_seed(command[1] & ((1 << 64) - 1))

    def _rng_state(self, command: list[Any], frames: list[Any]) -> bytes | int | None:
        """A generator's state (RNG_STATE with a device or a generator reference), or a new one
        set. Setting an explicit generator's state answers its seed (part of the state), which
        the client's ``initial_seed()`` reports from then on."""
        codec.check(len(command) in (2, 3), "RNG_STATE takes [RNG_STATE, device] or [RNG_STATE, device, state]")
        explicit = type(command[1]) is GeneratorRef
        generator = (self._explicit_generator(command[1]) if explicit
                     else self.generators[self._index_of(self._device(command[1]))])
        if len(command) == 2:
            return bytes(generator.get_state().numpy())
        codec.check(isinstance(command[2], bytes), "RNG_STATE's state must be bytes")
        try:
            generator.set_state(torch.frombuffer(bytearray(command[2]), dtype=torch.uint8))
        except RuntimeError as exc:  # a state of the wrong size or kind: torch's own message
            raise CommandError(ErrorKind.OP, "Generator.set_state", str(exc).splitlines()[0]) from None
        return generator.initial_seed() if explicit else None

    def _generator(self, command: list[Any], frames: list[Any]) -> None:
        """GENERATOR: make an explicit generator (``torch.Generator("cuda")``) under the id the
        client chose, on one of the session's devices, or drop one. A new generator starts from
        torch's default seed, as a new ``torch.Generator`` does on every device."""
        codec.check(len(command) in (2, 3), "GENERATOR takes [GENERATOR, id, device] or [GENERATOR, id]")
        generator_id = command[1]
        codec.check(type(generator_id) is int and generator_id >= 0,
                       lambda: f"a generator id is a non-negative integer, not {codec.brief(generator_id)}")
        if len(command) == 2:
            self.explicit_generators.pop(generator_id, None)
            return
        codec.check(generator_id not in self.explicit_generators, lambda: f"generator {generator_id} already exists")
        if len(self.explicit_generators) >= limits.MAX_GENERATORS:
            raise CommandError(ErrorKind.OOM, "torch.Generator",
                               f"this session holds {len(self.explicit_generators)} generators, the most the daemon "
                               "allows; drop the ones you no longer need (del them)")
        self.explicit_generators[generator_id] = torch.Generator(device=self._device(command[2]))

    def _explicit_generator(self, ref: GeneratorRef) -> torch.Generator:
        generator = self.explicit_generators.get(ref.id)
        if generator is None:
            raise CommandError(ErrorKind.HANDLE, "", f"generator {ref.id} does not belong to this session")
        return generator

    def _default_generator(self, entry: op_policy.OpEntry, args: list[Any], kwargs: dict[str, Any]) -> None:
        """A random op draws from the session's generator of its device unless the client named
        a generator of its own (a keyword argument, or a positional one for ``poisson`` and
        the like)."""
        at = entry.generator_at
        if at is not None and len(args) > at:
            if args[at] is None:
                args[at] = self.generators[self._index_of(values.device_of(args, kwargs))]
        elif kwargs.get("generator") is None:
            kwargs["generator"] = self.generators[self._index_of(values.device_of(args, kwargs))]

    def _event(self, command: list[Any], frames: list[Any]) -> None:
        codec.check(len(command) == 2 and isinstance(command[1], int), "EVENT takes [EVENT, id]")
        event: torch.cuda.Event | float
        if self.stream is not None:
            event = devices.timing_event()
            event.record(self.stream)
        else:
            event = time.perf_counter()
        self._events[command[1]] = event
        while len(self._events) > MAX_EVENTS:
            self._events.popitem(last=False)

    def _elapsed(self, command: list[Any], frames: list[Any]) -> float:
        codec.check(len(command) == 3, "ELAPSED takes [ELAPSED, start, end]")
        try:
            start, end = self._events[command[1]], self._events[command[2]]
        except (KeyError, TypeError):
            raise CommandError(ErrorKind.OP, "Event.elapsed_time", "both events must be recorded first") from None
        if isinstance(start, float):
            elapsed: float = (end - start) * 1000.0  # (both perf_counter() readings: see _event)
            return elapsed
        end.synchronize()
        return float(start.elapsed_time(end))

    def _query(self, command: list[Any], frames: list[Any]) -> Any:
        codec.check(len(command) in (2, 3) and isinstance(command[1], str), "QUERY takes [QUERY, what, argument?]")
        what = command[1]
        if what == "settings":  # what is set in the daemon's process while this session runs
            return numerics.in_effect()
        if what == "memory_fraction":
            codec.check(len(command) == 3, "QUERY memory_fraction takes a fraction")
            self.set_memory_fraction(command[2])
            return None
        if what == "memory":
            return self.memory_stats()
        if what == "stats":
            return {"ops": self.ops_executed, "batches": self.batches, "busy_s": self.busy_s, "host_s": self.host_s,
                    "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                    "bytes_exported": self.bytes_exported, "bytes_pulled": self.bytes_pulled,
                    "graph_runs": self.graph_runs, "graphs_defined": self.graphs_defined,
                    "handles": len(self.tensors), "generators": len(self.explicit_generators),
                    "cuda_graph_captures": self._cuda_graphs.captures if self._cuda_graphs else 0,
                    "cuda_graph_replays": self._cuda_graphs.replays if self._cuda_graphs else 0,
                    "cuda_graph_interpreted": dict(self._cuda_graphs.interpreted) if self._cuda_graphs else {},
                    "cuda_graphs_live": self._cuda_graphs.live if self._cuda_graphs else 0,
                    **self.compile_counts(),
                    "compiled_graph_runs": self._compiler.compiled_runs if self._compiler else 0,
                    "graphs_not_compiled": dict(self._compiler.interpreted) if self._compiler else {}}
        if what == "reset_peak_memory":
            self.memory.reset_peak()
            return None
        if what == "empty_cache":
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return None
        raise CommandError(ErrorKind.OP, f"QUERY {codec.brief(what)}", f"unknown query {codec.brief(what)}")

    def figures(self) -> dict[str, Any]:
        """The session's cumulative counters, for the daemon's metrics (REPORT while it runs, ENDED
        when it ends): plain fields the session keeps anyway, read here, not per op."""
        cuda_graphs = self._cuda_graphs
        return {"ops": self.ops_executed, "batches": self.batches, "device_time_s": self.busy_s,
                "bytes_in": self.bytes_in, "bytes_out": self.bytes_out, "errors": dict(self.errors),
                "graphs_defined": self.graphs_defined, "graph_runs": self.graph_runs,
                "step_replays": self.step_replays,
                "cuda_graph_replays": cuda_graphs.replays if cuda_graphs else 0,
                "bytes_exported": self.bytes_exported, "bytes_pulled": self.bytes_pulled}

    def compile_counts(self) -> dict[str, float]:
        """Graphs compiled for this session (``--graph-compiler``), compiles still running, and
        the seconds the finished ones took."""
        return {"graphs_compiled": self._compiler.compiles if self._compiler else 0,
                "graph_compiles_pending": self._compiler.pending if self._compiler else 0,
                "graph_compile_s": self._compiler.compile_s if self._compiler else 0.0}

    def memory_stats(self) -> dict[str, Any]:
        reserved = self.memory.allocated
        if self.device.type == "cuda":
            reserved = max(reserved, torch.cuda.memory_reserved(self.device))
        free, total = devices.memory_info(self.device)
        device_memory = self.device_memories[0]
        if device_memory is not None and device_memory.budget is not None:
            total = min(total, device_memory.budget)
            free = max(0, total - device_memory.resident_bytes)
        stats = {
            "device_free": free,
            "device_total": total,
            "allocated": self.memory.allocated,
            "peak": self.memory.peak,
            "reserved": reserved,
            "resident": self.memory.allocated - self.memory.spilled,
            "spilled": self.memory.spilled,
            "storages": self.memory.storage_count,
            "peak_storages": self.memory.peak_count,
            "handles": len(self.tensors),
            # As CUDA's allocator would serve them (torch.cuda.memory_stats): see PoolStats.
            "pools": {name: {field: getattr(pool, field) for field in PoolStats.__slots__}
                      for name, pool in (("large", self.memory.large_pool), ("small", self.memory.small_pool))},
        }
        if device_memory is not None:
            stats["device"] = device_memory.stats()
        return stats

    @contextmanager
    def _session_rng(self, device: torch.device | None) -> Iterator[None]:
        """Run an op that draws from the device's default generator on this session's stream."""
        generator = self.generators[self._index_of(device)]
        default = devices.default_generator(generator.device)
        saved = default.get_state()
        default.set_state(generator.get_state())
        try:
            yield
        finally:
            generator.set_state(default.get_state())
            default.set_state(saved)
