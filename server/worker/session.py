"""One client's state in its worker, and the handlers that execute its commands.

A session is one room built from a few: this module holds its state, the running of queued
batches in slices, its handle table and the execution of ops; its quota checks
(session_quota.py), graph mode and recorded steps (session_graphs.py), residency under
oversubscription (session_residency.py) and the other commands (session_commands.py) are mixins
in modules of their own, each with its job.

Each handler implements one command of :mod:`libremote_wire.messages`. A command that fails
records the session's *pending error* (reported in the next REPLY, like an asynchronous CUDA
error) and poisons the handles it would have produced, so later commands that use them fail with
a message naming the original failure instead of "unknown handle". The session stays usable:
commands that do not depend on the failure run normally.

Why this module is still ~600 lines: running batches, the handle table and op execution share
the per-command path, which is kept in one place for its speed (one attribute lookup per step).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from libremote_wire import codec, messages
from libremote_wire.codec import DeviceRef, GeneratorRef, HandleRef, ProtocolError
from libremote_wire.messages import Cmd, ErrorKind

from .. import limits
from ..policy import ANONYMOUS, Tenant
from . import devices, graphs, numerics, op_policy, programs, repeated_steps, sparse, values, zeroing
from .compiled_graphs import GraphCompiler
from .cuda_graphs import GraphCapture
from .errors import CommandError, QuotaRefusal
from .memory import MemoryAccount
from .residency import DeviceMemory, Lookahead, StorageRecord
from .session_commands import CommandsMixin
from .session_graphs import GraphsMixin
from .session_quota import QuotaMixin, TenantAccount
from .session_residency import ResidencyMixin
from .session_transfers import TransfersMixin

log = logging.getLogger("libremote.server")



@dataclass
class PendingBatch:
    """A BATCH waiting to run (or partly run): its commands run from ``cursor`` on."""

    seq: Any
    commands: list[Any]
    frames: list[Any]
    want_reply: bool
    nbytes: int = 0  # of its frames
    cursor: int = 0
    results: list[Any] = field(default_factory=list)
    out_frames: list[Any] = field(default_factory=list)


@dataclass
class Reply:
    """What the daemon sends back for a finished batch that asked for an answer."""

    seq: Any
    results: list[Any]
    frames: list[Any]
    error: list[str] | None
    malformed: bool = False


class Session(QuotaMixin, GraphsMixin, ResidencyMixin, CommandsMixin, TransfersMixin):
    """Handles, RNG, events, memory account and scheduling state of one connected client."""

    #: Live tensors this session may hold (the daemon sets ``--max-handles``).
    max_handles: int = limits.MAX_HANDLES

    def __init__(self, session_id: str, devices_: list[torch.device], client_info: dict[str, Any],
                 *, tenant: Tenant | None = None, priority: str = "normal", identity: bytes = b"",
                 slots: list[Any] | None = None, device_memories: list[DeviceMemory | None] | None = None,
                 cuda_graphs: str = "auto", graph_compiler: str = "none", owner: str | None = None,
                 account: TenantAccount | None = None) -> None:
        self.id = session_id
        #: The ZAP User-Id (CURVE key identity) that opened it; only that identity may use it.
        self.owner = owner
        #: The devices this session was given; the client's cuda:i is devices[i].
        self.devices = list(devices_)
        self.client_info = client_info
        self.identity = identity  # the client's ZeroMQ routing id
        #: The pool's DeviceSlots behind ``devices``; the first is where the session is scheduled.
        self.slots = list(slots or [])
        self.tenant = tenant or Tenant(ANONYMOUS, None, 8 << 30)
        #: The quota the tenant's sessions in this worker share (None: this session's alone).
        self.account = account
        if account is not None:
            account.sessions.append(self)
        self._memory_quota = self.tenant.memory_quota
        #: The client's own cap (``torch.cuda.set_per_process_memory_fraction``), or None.
        self._memory_cap: int | None = None
        #: What allocations are checked against: the quota, or the client's cap if lower.
        self.memory_limit = self._memory_quota
        self.weight = self.tenant.weight
        self.priority = priority
        self.virtual_time = 0.0
        self.queue: collections.deque[PendingBatch] = collections.deque()
        self.queued_bytes = 0  # frames of the queued batches
        #: Large replies ZeroMQ has not sent yet (the client has not read them): (tracker, bytes).
        self._unsent: collections.deque[tuple[Any, int]] = collections.deque()
        #: What the client streamed since it last asked for a reply (bounded: server/limits.py).
        self.inflow = limits.Inflow()
        self.tensors: dict[int, torch.Tensor] = {}
        self._storage_keys: dict[int, Any] = {}  # (a sparse tensor's: a tuple, see memory.py)
        #: The storages of sparse handles' indices, which no strided handle may share (sparse.py).
        self._sparse_indices = sparse.IndexStorages()
        self._failed: dict[int, str] = {}
        self._graphs: dict[int, graphs.Graph] = {}
        self._programs: dict[int, programs.Program] = {}
        #: Step templates (repeated_steps.py); None until the client defines one.
        self._steps: dict[int, repeated_steps.Step] | None = None
        #: Results of steps recorded without running (torch.cuda.graph) -> the step that holds
        #: them, and those of them the client has freed (dropped when the step goes).
        self._graph_pool: dict[int, int] = {}
        self._freed_in_graph_pool: set[int] = set()
        self._ops: dict[int, op_policy.OpEntry] = {}
        self._refused_ops: dict[int, CommandError] = {}
        self._events: collections.OrderedDict[int, Any] = collections.OrderedDict()
        #: Per device: the memory manager that spills to host RAM (None: no oversubscription).
        self.device_memories = list(device_memories or [None] * len(self.devices))
        managed = any(dm is not None for dm in self.device_memories)
        self.memory = MemoryAccount(self, self._device_memory_of if managed else None)
        # Each session launches on its own CUDA stream, so different sessions' kernels overlap
        # on the device and one session's sync waits for its own work only.
        self.stream = devices.cuda_stream(self.devices[0]) if self.devices[0].type == "cuda" else None
        self.generators = [torch.Generator(device=device) for device in self.devices]
        for generator in self.generators:
            generator.manual_seed(secrets.randbits(63))
        #: The program's own generators (``torch.Generator("cuda")``), by the id its client gave
        #: each (GENERATOR); at most limits.MAX_GENERATORS.
        self.explicit_generators: dict[int, torch.Generator] = {}
        #: Graph-mode graphs replayed as CUDA graphs (not under residency management: see there).
        replays = cuda_graphs == "emulate" or (cuda_graphs == "auto" and self.stream is not None)
        self._cuda_graphs = (GraphCapture(self.devices[0], self.generators[0], lambda: self._session_rng(self.devices[0]))
                             if replays and not managed else None)
        #: Graph-mode graphs compiled with inductor (``--graph-compiler``; not under residency
        #: management either: compiled code reads its inputs where they lie).
        self._compiler = (GraphCompiler(self.devices[0], self._resolve)
                          if graph_compiler == "inductor" and not managed else None)
        self.pending_error: CommandError | None = None
        #: torch's numerics switches for this session's work (SETTINGS; libremote/numerics.py).
        self.numerics = numerics.DEFAULTS
        self._last_in_batch = False
        self._running: tuple[Any, int] = (None, -1)  # (batch, position) of the command running
        self._program_at: tuple[programs.Program, int] | None = None  # in a replay: (step, position)
        self.ops_executed = 0
        self.batches = 0
        # Figures for the daemon's metrics (server/telemetry/): counted per batch, reply, failure
        # or graph call, never per op.
        self.bytes_in = 0  # tensor bytes the client sent (BATCH frames)
        self.bytes_out = 0  # tensor bytes sent back (REPLY frames)
        self.errors: dict[str, int] = {}  # failed commands, by ErrorKind value
        self.graphs_defined = 0  # GRAPH definitions (graph-cache misses)
        self.graph_runs = 0  # RUN_GRAPH calls of graphs defined earlier (graph-cache hits)
        self.step_replays = 0  # REPLAYs of captured steps
        self.busy_s = 0.0  # time charged for this session's commands: host time, and device time beyond it
        self.host_s = 0.0  # host time the daemon spent executing this session's commands
        self.created = time.time()
        self.last_seen = time.monotonic()  # any message, PINGs included
        self.last_active = self.last_seen  # last BATCH (for --idle-timeout)
        self._handlers: dict[int, Callable[[list[Any], list[Any]], Any]] = {
            Cmd.OP: self._op,
            Cmd.OP_SYNC: self._op_sync,
            Cmd.UPLOAD: self._upload,
            Cmd.PUT: self._put,
            Cmd.GRAPH: self._define_graph,
            Cmd.RUN_GRAPH: self._run_graph,
            Cmd.PROGRAM: self._define_program,
            Cmd.REPLAY: self._replay,
            Cmd.FETCH: self._fetch,
            Cmd.FREE: self._free,
            Cmd.SYNC: self._sync,
            Cmd.SEED: self._seed,
            Cmd.RNG_STATE: self._rng_state,
            Cmd.GENERATOR: self._generator,
            Cmd.EVENT: self._event,
            Cmd.ELAPSED: self._elapsed,
            Cmd.QUERY: self._query,
            Cmd.SETTINGS: self._settings,
            Cmd.EXPORT: self._export,
            Cmd.PULL: self._pull,
            Cmd.RUN_STEP: self._malformed_step,
        }

    def _malformed_step(self, command: list[Any], frames: list[Any]) -> None:
        """A STEP or RUN_STEP that :func:`repeated_steps.expand_batch` refused, at its turn."""
        raise ProtocolError(str(command[1]) if len(command) == 2 else "RUN_STEP out of place")

    @property
    def memory_quota(self) -> int:
        """The operator's quota for this session (the tenant's, or what ``libremote admin`` set)."""
        return self._memory_quota

    @memory_quota.setter
    def memory_quota(self, quota: int) -> None:
        self._memory_quota = quota
        self.memory_limit = quota if self._memory_cap is None else min(quota, self._memory_cap)

    def set_memory_fraction(self, fraction: Any) -> None:
        """``torch.cuda.set_per_process_memory_fraction``: cap this session at ``fraction`` of its
        device's memory (below its quota; a fraction of 1 leaves only the quota)."""
        codec.check(type(fraction) in (int, float) and 0 <= fraction <= 1, "a memory fraction is a number in [0, 1]")
        total = self.memory_stats()["device_total"]
        self._memory_cap = None if fraction >= 1 else int(fraction * total)
        self.memory_quota = self._memory_quota

    # ------------------------------------------------------------------------------------------
    # Batch execution: batches queue up and run in slices the scheduler hands out
    # ------------------------------------------------------------------------------------------
    def enqueue(self, seq: Any, commands: Any, frames: list[Any], want_reply: bool, nbytes: int = 0) -> None:
        codec.check(isinstance(commands, list), "BATCH commands must be a list")
        if self._steps is not None or any(type(c) is list and c and c[0] == Cmd.STEP for c in commands[:8]):
            # Repeated steps (repeated_steps.py): queued as the commands they stand for. (A
            # client's first template comes at the start of a batch, before its sync command.)
            if self._steps is None:
                self._steps = {}
            commands = repeated_steps.expand_batch(self._steps, commands)
        self.queue.append(PendingBatch(seq, commands, frames, want_reply, nbytes))
        self.queued_bytes += nbytes

    def has_work(self) -> bool:
        """Whether commands wait to run, and may: a session whose client has not read replies
        of :data:`~.limits.MAX_UNSENT_REPLY_BYTES` or more waits until it does (its queue is
        bounded too: limits.Inflow), so a client that asks for data and never reads it makes
        the worker hold at most that much."""
        return bool(self.queue) and (not self._unsent or self._unsent_bytes() < limits.MAX_UNSENT_REPLY_BYTES)

    def replies_unsent(self, tracker: Any, nbytes: int) -> None:
        """A large reply went into ZeroMQ's queue: count it until ZeroMQ has sent it."""
        self._unsent.append((tracker, nbytes))

    def _unsent_bytes(self) -> int:
        while self._unsent and self._unsent[0][0].done:
            self._unsent.popleft()
        return sum(nbytes for _, nbytes in self._unsent)

    def run_slice(self, max_commands: int, max_seconds: float = float("inf")) -> list[Reply]:
        """Run queued commands until ``max_commands`` ran or ``max_seconds`` passed (checked
        between commands); return replies for the batches that finished.

        A malformed batch is dropped at the command that is malformed and answered with a
        protocol error; the commands before it have run.
        """
        started = time.perf_counter()
        numerics.switch_to(self.numerics)
        try:
            with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
                if self.memory.spilled:
                    # Also when the session was waiting for its turn or idle: on a GPU the copies
                    # overlap the kernels other sessions (and this one) already queued, and this
                    # slice's first kernels.
                    self._prefetch()
                return self._run_queued(max_commands, started + max_seconds)
        finally:
            elapsed = time.perf_counter() - started
            self.host_s += elapsed  # (busy_s, what the scheduler charges, is the loop's to add)

    def _run_queued(self, max_commands: int, deadline: float) -> list[Reply]:
        replies: list[Reply] = []
        while self.queue and max_commands > 0:
            batch = self.queue[0]
            stop = min(len(batch.commands), batch.cursor + max_commands)
            position = batch.cursor
            try:
                while position < stop:
                    self._run_command(batch, position)
                    position += 1
                    if time.perf_counter() > deadline:
                        break
            except ProtocolError as exc:
                self.queued_bytes -= self.queue.popleft().nbytes
                replies.append(Reply(batch.seq, [], [], [ErrorKind.PROTOCOL.value, "", str(exc)], malformed=True))
                continue
            max_commands -= position - batch.cursor
            batch.cursor = position
            if position == len(batch.commands):
                self.queued_bytes -= self.queue.popleft().nbytes
                self.batches += 1
                if batch.want_reply:
                    replies.append(Reply(batch.seq, batch.results, batch.out_frames, self.take_error()))
            if time.perf_counter() > deadline:
                break
        return replies

    def lookahead(self, limit: int) -> Lookahead:
        """What the next ``limit`` commands (the running one first) will do to this session's
        storages: the rest of the captured step being replayed, if one is, then the queued
        batches. See :class:`~.residency.Lookahead`."""
        uses: list[StorageRecord] = []
        used: set[StorageRecord] = set()
        freed_handles: set[int] = set()
        freed_of: dict[StorageRecord, int] = {}  # distinct handles of a storage freed before its first use
        dead: set[StorageRecord] = set()
        storage_keys, record_at = self._storage_keys, self.memory.record_at
        for command in itertools.islice(self._upcoming_commands(), limit):
            if (isinstance(command, list) and len(command) == 2 and command[0] == Cmd.FREE
                    and isinstance(command[1], list)):
                for handle in command[1]:
                    if not isinstance(handle, int) or handle in freed_handles:
                        continue
                    freed_handles.add(handle)
                    key = storage_keys.get(handle)
                    record = record_at(key) if key is not None else None
                    if record is None:
                        continue
                    freed_of[record] = freed_of.get(record, 0) + 1
                    if freed_of[record] == self.memory.handle_count(key):
                        dead.add(record)  # every handle on it dropped, and nothing reads it first
                continue
            if isinstance(command, list) and len(command) == 2 and command[0] == Cmd.REPLAY:
                program = self._programs.get(command[1]) if isinstance(command[1], int) else None
                handles: Iterable[int] = program.reads if program is not None else ()
            else:
                handles = values.handles_named(command)
            for handle in handles:
                if handle in freed_handles:
                    continue  # a handle freed earlier in the queue names a new tensor by now
                key = storage_keys.get(handle)
                record = record_at(key) if key is not None else None
                if record is not None:
                    uses.append(record)
                    used.add(record)
        return Lookahead(uses, dead - used)  # read before its last handle goes, or after through another: alive

    def _upcoming_commands(self) -> Iterator[Any]:
        """The command running now, if one is, and the commands after it. (The running one
        counts: an op run in slices, server/foreach_chunks.py, has operands no slice protects
        yet, and they are needed next, not free to go.)"""
        if self._program_at is not None:
            program, position = self._program_at
            yield from program.commands[position:]
        running_batch, running_position = self._running
        for batch in self.queue:
            start = batch.cursor
            if batch is running_batch and running_position >= start:  # cursor moves after a slice
                start = running_position
            yield from batch.commands[start:]

    def _run_command(self, batch: PendingBatch, position: int) -> None:
        self._running = (batch, position)
        command = batch.commands[position]
        self._last_in_batch = position == len(batch.commands) - 1
        # (Plain ifs, not codec.check with a message callback: this runs for every command.)
        if type(command) is not list or not command or type(command[0]) is not int:
            raise ProtocolError(f"malformed command {codec.brief(command)}")
        kind = command[0]
        handler = self._handlers.get(kind)
        if handler is None:
            raise ProtocolError(f"unknown command kind {kind}")
        try:
            value = handler(command, batch.frames)
        except CommandError as exc:
            self._fail(exc, command)
            value = None
        except ProtocolError:
            raise
        except torch.OutOfMemoryError as exc:
            self._fail(CommandError(ErrorKind.OOM, self._describe(command), values.error_message(exc)), command)
            value = None
        except Exception as exc:  # the op's own error: report it, keep serving
            self._fail(CommandError(ErrorKind.OP, self._describe(command), values.error_message(exc)), command)
            value = None
        if kind in messages.RESULT_COMMANDS:
            if kind == Cmd.FETCH and value is not None:
                meta, buffer = value
                batch.out_frames.append(buffer)
                value = meta + [len(batch.out_frames)]
            batch.results.append(value)

    def take_error(self) -> list[str] | None:
        error, self.pending_error = self.pending_error, None
        return None if error is None else error.to_wire()

    def _fail(self, error: CommandError, command: list[Any]) -> None:
        kind = error.kind.value
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if self.pending_error is None:
            self.pending_error = error
        if command[0] in (Cmd.OP, Cmd.OP_SYNC) and len(command) >= 5:
            produced: Any = command[4]
        elif command[0] in (Cmd.PUT, Cmd.PULL) and len(command) >= 2:
            produced = command[1]
        elif command[0] == Cmd.RUN_GRAPH and len(command) >= 4:
            produced = command[3]
        else:
            return
        origin = f"{error.op} failed: {error.message}"
        for handle in values.flatten_handles(produced):
            if isinstance(handle, int) and handle not in self.tensors:
                self._failed[handle] = origin
        while len(self._failed) > limits.MAX_POISONED_HANDLES:  # forget the oldest
            del self._failed[next(iter(self._failed))]

    def _describe(self, command: list[Any]) -> str:
        if command[0] in (Cmd.OP, Cmd.OP_SYNC) and len(command) > 1:
            ref = command[1]
            if isinstance(ref, list) and len(ref) == 2:
                return ref[1] if type(ref[1]) is str else codec.brief(ref[1])
            entry = self._ops.get(ref) if isinstance(ref, int) else None
            return entry.name if entry else f"op #{codec.brief(ref)}"
        try:
            return Cmd(command[0]).name
        except ValueError:
            return f"command {command[0]}"

    # ------------------------------------------------------------------------------------------
    # Handles
    # ------------------------------------------------------------------------------------------
    def tensor(self, handle: int) -> torch.Tensor:
        try:
            return self.tensors[handle]
        except (KeyError, TypeError):
            origin = self._failed.get(handle)
            if origin is not None:
                raise CommandError(ErrorKind.HANDLE, "", f"input was never computed: {origin}") from None
            raise CommandError(
                ErrorKind.HANDLE, "", f"handle {codec.brief(handle)} does not belong to this session"
            ) from None

    def _store(self, handle: Any, tensor: Any) -> None:
        if not isinstance(handle, int) or isinstance(handle, bool):
            raise ProtocolError(f"output handle must be an integer, not {codec.brief(handle)}")
        if len(self.tensors) >= self.max_handles:
            raise CommandError(ErrorKind.OOM, "", f"this session holds {len(self.tensors)} tensors, the most the daemon "
                               "allows (--max-handles); free tensors you no longer need (del them)")
        if not isinstance(tensor, torch.Tensor):
            raise CommandError(ErrorKind.OP, "", f"expected a tensor result for handle {handle}, got {type(tensor).__name__}")
        if handle in self.tensors:
            raise ProtocolError(f"handle {handle} is already in use")
        strided = tensor.layout is torch.strided  # (read once: this runs for every stored result)
        refusal = values.unstorable_strided(tensor, self.devices) if strided else values.unstorable(tensor, self.devices)
        if refusal is not None:  # checked before anything is stored: close() never meets it
            raise CommandError(ErrorKind.REFUSED, "", f"the result for handle {handle} {refusal}")
        if strided:
            if self._sparse_indices.counts:  # (a dict's truth)
                tensor = self._sparse_indices.strided(tensor)
            self._storage_keys[handle] = self.memory.add_strided(tensor)
        else:  # sparse (unstorable refuses other layouts)
            tensor = self._sparse_indices.admit(tensor, self.memory.is_charged)
            self._sparse_indices.add(handle, tensor)
            self._storage_keys[handle] = self.memory.add(tensor)
        if self._failed:  # (almost always empty)
            self._failed.pop(handle, None)
        self.tensors[handle] = tensor

    def reclaim_captures(self) -> None:
        """Let go of CUDA-graph captures whose models the client has dropped (housekeeping)."""
        if self._cuda_graphs is not None:
            self._cuda_graphs.reclaim(self.tensors)

    def release_handles(self, handles: Any) -> None:
        for handle in handles:
            self._drop(handle)

    def _drop(self, handle: int) -> None:
        if self.tensors.pop(handle, None) is not None:
            self.memory.release(self._storage_keys.pop(handle))
            if self._sparse_indices.counts:
                self._sparse_indices.remove(handle)
        else:
            self._failed.pop(handle, None)

    def close(self) -> int:
        """Drop every handle; return the bytes released."""
        if self.account is not None and self in self.account.sessions:
            self.account.sessions.remove(self)
        released = self.memory.allocated
        for handle in list(self.tensors):
            self._drop(handle)
        self._failed.clear()
        self._events.clear()
        if self._cuda_graphs is not None:
            self._cuda_graphs.close()
        if self._compiler is not None:
            self._compiler.close()
        return released

    @property
    def device(self) -> torch.device:
        """The session's first device (where it is scheduled)."""
        return self.devices[0]

    def _device(self, index: Any) -> torch.device:
        if not isinstance(index, int) or not 0 <= index < len(self.devices):
            raise CommandError(ErrorKind.OP, "", f"device cuda:{codec.brief(index)} does not exist: this session has "
                                                 f"{len(self.devices)} device(s) (LIBREMOTE_DEVICES)")
        return self.devices[index]

    def _index_of(self, device: torch.device | None) -> int:
        if device is not None:
            for index, candidate in enumerate(self.devices):
                if candidate == device or (candidate.type == device.type == "cpu"):
                    return index
        return 0

    def _resolve(self, value: Any, depth: int = 0) -> Any:
        """A decoded argument with handles replaced by this session's tensors (and device
        references by its devices). Nested at most codec.MAX_NESTING deep."""
        kind = type(value)
        if kind is HandleRef:
            tensor = self.tensors.get(value.handle)
            return tensor if tensor is not None else self.tensor(value.handle)
        if kind is list:
            if depth >= codec.MAX_NESTING:
                raise ProtocolError(f"an argument is nested more than {codec.MAX_NESTING} deep")
            inner = depth + 1
            return [self._resolve(item, inner) for item in value]
        if kind is DeviceRef:
            return self._device(value.index)
        if kind is GeneratorRef:
            return self._explicit_generator(value)
        return value

    def _resolve_arguments(self, args: list[Any]) -> list[Any]:
        """:meth:`_resolve` of an op's argument list, with its handles (most arguments) looked up
        here rather than in a call each: this runs for every op."""
        tensors = self.tensors
        resolved = []
        for item in args:
            if type(item) is HandleRef:
                tensor = tensors.get(item.handle)
                resolved.append(tensor if tensor is not None else self.tensor(item.handle))
            else:
                resolved.append(self._resolve(item, 1))
        return resolved

    # ------------------------------------------------------------------------------------------
    # Command handlers, one per protocol command
    # ------------------------------------------------------------------------------------------
    def _op_entry(self, ref: Any) -> op_policy.OpEntry:
        entry = self._ops.get(ref) if type(ref) is int else None
        if entry is not None:  # the common case: an op this session named before
            return entry
        if isinstance(ref, list):
            codec.check(len(ref) == 2 and isinstance(ref[0], int) and type(ref[1]) is str,
                           "op reference must be [id, name]")
            op_id, name = ref
            if op_id not in self._ops and len(self._ops) + len(self._refused_ops) >= limits.MAX_OP_IDS:
                raise ProtocolError(f"a session may define at most {limits.MAX_OP_IDS} op ids")
            try:
                entry = op_policy.resolve(name)
            except op_policy.OpRefused as exc:
                # Remember the refusal: the client will name this op by its id from now on.
                refusal = self._refused_ops[op_id] = CommandError(ErrorKind.REFUSED, codec.brief(name), str(exc))
                raise refusal from None
            self._ops[op_id] = entry
            return entry
        refused = self._refused_ops.get(ref) if isinstance(ref, int) else None
        if refused is not None:
            raise CommandError(refused.kind, refused.op, refused.message)
        raise ProtocolError(f"op id {codec.brief(ref)} was never defined in this session")

    def _run_op(self, command: list[Any]) -> tuple[op_policy.OpEntry, Any]:
        codec.check(len(command) == 5, "OP takes [OP, op, args, kwargs, outs]")
        _, ref, args, kwargs, outs = command
        entry = self._op_entry(ref)
        codec.check(type(args) is list and type(kwargs) is dict, "OP args must be a list and kwargs a map")
        try:
            args = self._resolve_arguments(args)
            if kwargs:
                kwargs = {key: self._resolve(value) for key, value in kwargs.items()}
        except CommandError as exc:
            exc.op = entry.name
            raise
        allocated_before = self.memory.allocated
        if entry.foreach and self.memory.managed:
            sliced = self._foreach_in_slices(entry, args, kwargs, outs)
            if sliced is not None:
                if self._over_quota():
                    self._refuse_over_quota(entry.name, allocated_before, outs)
                return entry, sliced[0]
        try:
            result, inputs = self._invoke(entry, args, kwargs)
        except QuotaRefusal as exc:
            # The client already gave the tensors the op resizes their new sizes: as when the
            # quota is exceeded after the op, they are dropped, and using them raises this error.
            for handle in self._resized_handles(entry, command[2], command[3]):
                self._drop(handle)
                self._failed[handle] = f"{entry.name} failed: {exc.message}"
            raise
        grown = self._remeasure(entry, args, kwargs, command[2], command[3]) if entry.resized_arguments else ()
        if self._sparse_indices.counts and entry.written_arguments:
            self._recheck_written_sparse(entry, args, kwargs, command[2], command[3])
        self._store_outputs(entry, result, outs)
        if self._over_quota():
            self._refuse_over_quota(entry.name, allocated_before, outs, grown)
        if self.memory.managed:
            self._fit_on_device(entry.name, inputs, outs)
        return entry, result

    def _invoke(self, entry: op_policy.OpEntry, args: list[Any], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        """Run one op on resolved arguments: the session's generator for random ops, operands
        resident first. Returns the result and the storage records it was given."""
        if entry.sanitize is not None:
            entry.sanitize(args, kwargs)
        if entry.check_arguments is not None:
            try:
                entry.check_arguments(args, kwargs, self.devices)
            except op_policy.ArgumentRefused as exc:
                raise CommandError(ErrorKind.REFUSED, entry.name, str(exc)) from None
        if entry.takes_generator:
            self._default_generator(entry, args, kwargs)
        inputs = self._make_resident(entry.name, values.tensors_in(args, kwargs)) if self.memory.managed else ()
        self._check_quota_before(entry, args, kwargs)  # (after: a spilled storage has no bytes to measure)
        # (Both zeroing rules are off the common path: server/zeroing.py.)
        sizes = zeroing.StorageSizes(args, kwargs) if entry.resized_arguments else None
        if entry.seeded_without_generator and not (self._cuda_graphs is not None and self._cuda_graphs.capturing):
            with self._session_rng(values.device_of(args, kwargs)):
                result = self._call(entry, args, kwargs, inputs)
        else:
            result = self._call(entry, args, kwargs, inputs)
        if entry.zero_fill_result:
            zeroing.zero_fresh_results(result, args, kwargs)
        elif entry.trims_results or (type(result) is torch.Tensor and result.layout is not torch.strided):
            # (A sparse kernel may allocate indices and values for more elements than it keeps:
            # sparse + sparse sizes them for both inputs' nnz.)
            zeroing.zero_beyond_results(result, args, kwargs)
        if sizes is not None:
            sizes.zero_growth(entry, args, kwargs)
        self.ops_executed += 1
        return result, inputs

    def _recheck_written_sparse(self, entry: op_policy.OpEntry, args: list[Any], kwargs: dict[str, Any],
                                wire_args: list[Any], wire_kwargs: dict[str, Any]) -> None:
        """Each sparse tensor the op wrote in place is stored again: charged for the storages it
        uses now, and checked against torch's invariants (``_coalesced_(True)`` on unsorted
        indices). One that fails is dropped and its handle poisoned (sparse.py)."""
        for handle, tensor in sparse.written_sparse(entry.written_arguments, args, kwargs, wire_args, wire_kwargs,
                                                    HandleRef):
            if self.tensors.get(handle) is not tensor:
                continue
            reason = values.unstorable(tensor, self.devices)
            self._drop(handle)
            if reason is not None:
                message = f"the tensor it wrote in place (handle {handle}) {reason}; it was dropped"
                self._failed[handle] = f"{entry.name} failed: {message}"
                raise CommandError(ErrorKind.REFUSED, entry.name, message)
            self._store(handle, tensor)

    def _store_outputs(self, entry: op_policy.OpEntry, result: Any, outs: Any) -> None:
        if outs is None:
            return
        codec.check(isinstance(outs, list), "OP outs must be a list")
        if len(outs) == 1 and type(outs[0]) is int and entry.returns_one_tensor:
            self._store(outs[0], result)  # the common case: one new tensor
            return
        returned = values.returned_values(entry, result)
        codec.check(len(outs) <= len(returned), lambda: f"{entry.name} returns {len(returned)} values, outs names {len(outs)}")
        for value, out in zip(returned, outs):
            if out is None:
                continue
            if isinstance(out, list):
                codec.check(isinstance(value, (list, tuple)) and len(value) == len(out),
                               lambda: f"{entry.name}: outs do not match the returned list")
                for item, handle in zip(value, out):
                    self._store(handle, item)
            elif value is None and isinstance(out, int):
                # An optional result the kernel left undefined (e.g. the bias gradient of an
                # attention backward that did not need one). OP_SYNC tells the client it is None;
                # a streamed op's client expected a tensor, so using it names this op.
                self._failed[out] = f"{entry.name} returned no tensor for this output"
            else:
                self._store(out, value)

    def _op(self, command: list[Any], frames: list[Any]) -> None:
        self._run_op(command)

    def _op_sync(self, command: list[Any], frames: list[Any]) -> list[Any]:
        entry, result = self._run_op(command)
        returned = values.returned_values(entry, result)
        return [[values.wire_value(value) for value in returned], [values.wire_meta(value) for value in returned]]
