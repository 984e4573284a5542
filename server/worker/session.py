"""One client's state on the daemon, and the handlers that execute its commands.

Each handler below implements one command of :mod:`libremote_wire.messages`; ``execute`` runs a
batch in order. A command that fails records the session's *pending error* (reported in the next
REPLY, like an asynchronous CUDA error) and poisons the handles it would have produced, so later
commands that use them fail with a message naming the original failure instead of "unknown
handle". The session stays usable: commands that do not depend on the failure run normally.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch

from libremote_wire import codec, messages, torch_codec
from libremote_wire.codec import DeviceRef, GeneratorRef, HandleRef, ProtocolError
from libremote_wire.messages import Cmd, ErrorKind

from .. import limits
from . import devices, foreach_chunks, graphs, numerics, op_policy, preflight, programs, sparse, values, zeroing
from .compiled_graphs import GraphCompiler
from .cuda_graphs import GraphCapture
from .memory import MemoryAccount, PoolStats
from .residency import DeviceMemory, Lookahead, SpillExhausted, StorageRecord
from ..policy import ANONYMOUS, Tenant

log = logging.getLogger("libremote.server")

_MAX_EVENTS = 4096


class CommandError(Exception):
    """A command failed; ``kind`` is an :class:`ErrorKind`, ``op`` names what failed."""

    def __init__(self, kind: ErrorKind, op: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.op = op
        self.message = message

    def to_wire(self) -> list[str]:
        return [self.kind.value, self.op, self.message]


class QuotaRefusal(CommandError):
    """An op refused before it ran: what it would allocate does not fit in the session's quota."""


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


class TenantAccount:
    """A tenant's memory quota, shared by its sessions in its worker: what they hold together
    stays within it (each session also within its own quota, by default the same figure)."""

    def __init__(self, quota: int) -> None:
        self.quota = quota
        self.sessions: list[Session] = []

    def allocated(self) -> int:
        return sum(session.memory.allocated for session in self.sessions)


class Session:
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
        self.stream = torch.cuda.Stream(self.devices[0]) if self.devices[0].type == "cuda" else None
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
        }

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

    def _run_command(self, batch: "PendingBatch", position: int) -> None:
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
        if self.pending_error is None:
            self.pending_error = error
        if command[0] in (Cmd.OP, Cmd.OP_SYNC) and len(command) >= 5:
            produced: Any = command[4]
        elif command[0] == Cmd.PUT and len(command) >= 2:
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
        refusal = values.unstorable(tensor, self.devices)
        if refusal is not None:  # checked before anything is stored: close() never meets it
            raise CommandError(ErrorKind.REFUSED, "", f"the result for handle {handle} {refusal}")
        if tensor.layout is not torch.strided:  # sparse (unstorable refuses other layouts)
            tensor = self._sparse_indices.admit(tensor, self.memory.is_charged)
            self._sparse_indices.add(handle, tensor)
        elif self._sparse_indices.counts:  # (a dict's truth: this runs for every stored result)
            tensor = self._sparse_indices.strided(tensor)
        self._storage_keys[handle] = self.memory.add(tensor)
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
        refusal = self._refused_ops.get(ref) if isinstance(ref, int) else None
        if refusal is not None:
            raise CommandError(refusal.kind, refusal.op, refusal.message)
        raise ProtocolError(f"op id {codec.brief(ref)} was never defined in this session")

    def _run_op(self, command: list[Any]) -> tuple[op_policy.OpEntry, Any]:
        codec.check(len(command) == 5, "OP takes [OP, op, args, kwargs, outs]")
        _, ref, args, kwargs, outs = command
        entry = self._op_entry(ref)
        codec.check(type(args) is list and type(kwargs) is dict, "OP args must be a list and kwargs a map")
        try:
            args = self._resolve(args)
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

    # ------------------------------------------------------------------------------------------
    # Quota: a session never holds more than its tenant's memory quota
    # ------------------------------------------------------------------------------------------
    def _check_quota_before(self, entry: op_policy.OpEntry, args: list[Any], kwargs: dict[str, Any]) -> None:
        """Refuse an op before it runs when what it would allocate is known not to fit in the
        session's quota (server/preflight.py; cheap for ops that surely fit)."""
        headroom = self._headroom()
        needed = preflight.needed_bytes(entry, args, kwargs, headroom)
        if needed is not None and needed > headroom:
            raise QuotaRefusal(ErrorKind.OOM, entry.name, self._quota_message(self.memory.allocated, needed))

    @staticmethod
    def _resized_handles(entry: op_policy.OpEntry, wire_args: list[Any], wire_kwargs: dict[str, Any]) -> list[int]:
        """Handles of the arguments the op may resize (``OpEntry.resized_arguments``)."""
        handles = []
        for where, key in entry.resized_arguments:
            wire = (wire_args[key] if key < len(wire_args) else None) if where == "arg" else wire_kwargs.get(key)
            if isinstance(wire, HandleRef):
                handles.append(wire.handle)
        return handles

    def _remeasure(self, entry: op_policy.OpEntry, args: list[Any], kwargs: dict[str, Any],
                   wire_args: list[Any], wire_kwargs: dict[str, Any]) -> list[int]:
        """Re-read storage sizes of arguments the op may have resized; the handles that grew."""
        grown = []
        for where, key in entry.resized_arguments:
            value = (args[key] if key < len(args) else None) if where == "arg" else kwargs.get(key)
            wire = (wire_args[key] if key < len(wire_args) else None) if where == "arg" else wire_kwargs.get(key)
            if isinstance(value, torch.Tensor) and isinstance(wire, HandleRef) and value.layout is torch.strided and (
                    self._charge_new_storage(wire.handle, value) or self.memory.refresh(value)):
                grown.append(wire.handle)
        return grown

    def _charge_new_storage(self, handle: int, tensor: torch.Tensor) -> bool:
        """After ``set_``, the handle's tensor may use another storage than before: charge (and,
        under oversubscription, track) that one for it instead, so that every storage's handle
        count stays exact (Lookahead.dead relies on it). Returns whether the session grew."""
        key = self._storage_keys.get(handle)
        if key is None or key == tensor.untyped_storage()._cdata:
            return False
        before = self.memory.allocated
        self._storage_keys[handle] = self.memory.add(tensor)
        self.memory.release(key)
        return self.memory.allocated > before

    def _refuse_over_quota(self, what: str, allocated_before: int, outs: Any, grown: Any = ()) -> None:
        """The op left the session over its quota: undo its outputs and raise the OOM error.
        Tensors it grew in place (resize_, out=) cannot be shrunk back consistently with the
        client's view of them, so they are dropped and poisoned: using them raises this error."""
        needed = self.memory.allocated - allocated_before
        message = self._quota_message(allocated_before, needed)
        for handle in [*values.flatten_handles(outs), *grown]:
            if isinstance(handle, int):
                self._drop(handle)
                self._failed[handle] = f"{what} failed: {message}"
        raise CommandError(ErrorKind.OOM, what, message)

    def _headroom(self) -> int:
        """Bytes this session may still allocate: within its own quota (or cap), and within its
        tenant's, which all the tenant's sessions in this worker share."""
        room = self.memory_limit - self.memory.allocated
        account = self.account
        if account is not None and (len(account.sessions) > 1 or account.quota < self.memory_limit):
            room = min(room, account.quota - account.allocated())
        return room

    def _over_quota(self, extra: int = 0) -> bool:
        return self._headroom() < extra

    def _tenant_binds(self) -> bool:
        """Whether the tenant's shared quota, not this session's own, is what is short."""
        account = self.account
        return account is not None and account.quota - account.allocated() < self.memory_limit - self.memory.allocated

    def _quota_message(self, in_use: int, needed: int) -> str:
        if self._tenant_binds():
            account = self.account
            assert account is not None
            return (
                f"CUDA out of memory: tenant {self.tenant.name!r} may hold {values.size_text(account.quota)} across its "
                f"{len(account.sessions)} sessions, {values.size_text(account.allocated())} are in use and the request "
                f"needs {values.size_text(needed)} more. Free tensors you no longer need (del them), close other "
                "sessions of the tenant, or ask the operator for a larger quota."
            )
        if self.memory_limit < self._memory_quota:
            return (
                f"CUDA out of memory: this process limited itself to {values.size_text(self.memory_limit)} "
                f"(torch.cuda.set_per_process_memory_fraction), {values.size_text(in_use)} are in use and the "
                f"request needs {values.size_text(needed)} more. Free tensors you no longer need (del them), or "
                "raise the fraction."
            )
        return (
            f"CUDA out of memory: this session's quota is {values.size_text(self.memory_quota)}, {values.size_text(in_use)} "
            f"are in use and the request needs {values.size_text(needed)} more (tenant {self.tenant.name!r}). "
            "Free tensors you no longer need (del them), or ask the operator for a larger quota."
        )

    # ------------------------------------------------------------------------------------------
    # Graph mode: graphs defined once, run on handles (see server/graphs.py)
    # ------------------------------------------------------------------------------------------
    def _define_graph(self, command: list[Any], frames: list[Any]) -> None:
        codec.check(len(command) == 5, "GRAPH takes [GRAPH, id, input count, nodes, outputs]")
        _, graph_id, input_count, nodes, outputs = command
        codec.check(isinstance(graph_id, int) and not isinstance(graph_id, bool), "graph id must be an integer")
        if graph_id not in self._graphs and len(self._graphs) >= graphs.MAX_GRAPHS_PER_SESSION:
            raise CommandError(ErrorKind.OP, "graph", f"a session may define at most {graphs.MAX_GRAPHS_PER_SESSION} "
                               "graphs; recompiling on every new input shape? mark dynamic shapes or pad inputs")
        try:
            self._graphs[graph_id] = graphs.define(input_count, nodes, outputs)
        except op_policy.OpRefused as exc:
            raise CommandError(ErrorKind.REFUSED, "graph", str(exc)) from None

    def _run_graph(self, command: list[Any], frames: list[Any]) -> None:
        codec.check(len(command) == 4, "RUN_GRAPH takes [RUN_GRAPH, id, inputs, outs]")
        _, graph_id, wire_inputs, outs = command
        graph = self._graphs.get(graph_id) if isinstance(graph_id, int) else None
        codec.check(graph is not None, lambda: f"graph {codec.brief(graph_id)} was never defined in this session")
        codec.check(isinstance(wire_inputs, list) and len(wire_inputs) == graph.input_count,
                       lambda: f"the graph takes {graph.input_count} inputs")
        codec.check(isinstance(outs, list) and len(outs) == len(graph.outputs), "RUN_GRAPH outs do not match the graph")
        allocated_before = self.memory.allocated
        inputs = self._resolve(wire_inputs)
        failing = [""]

        def call(entry: op_policy.OpEntry, args: list[Any], kwargs: dict[str, Any]) -> Any:
            failing[0] = entry.name
            result = self._invoke(entry, args, kwargs)[0]
            # Intermediates are the session's memory while they live: the quota sees the run's peak.
            for tensor in zeroing.tensors_of(result):
                self.memory.hold(tensor)
            if self._over_quota():
                needed = self.memory.allocated - allocated_before
                raise CommandError(ErrorKind.OOM, entry.name, self._quota_message(allocated_before, needed))
            return result

        def interpret(inputs: list[Any]) -> list[Any]:
            return graphs.run(graph, inputs, call, self._resolve)

        execute, settled = interpret, True
        if self._compiler is not None:
            execute, settled = self._compiler.executor(graph_id, graph, inputs, interpret)
            if execute is not interpret:
                failing[0] = "inductor-compiled code"
        try:
            if self._cuda_graphs is not None and settled:
                results = self._cuda_graphs.run(graph_id, graph, inputs, execute)
            else:
                results = execute(inputs)
        except CommandError as exc:
            exc.op = f"{failing[0]} (in a compiled {graph.name})"
            raise
        except torch.OutOfMemoryError as exc:
            raise CommandError(ErrorKind.OOM, f"{failing[0]} (in a compiled {graph.name})",
                               values.error_message(exc)) from None
        except Exception as exc:
            raise CommandError(ErrorKind.OP, f"{failing[0]} (in a compiled {graph.name})",
                               values.error_message(exc)) from None
        for handle, value in zip(outs, results):
            if handle is not None:
                self._store(handle, value)
        if self._over_quota():
            self._refuse_over_quota(graph.name, allocated_before, outs, ())
        if self.memory.managed:
            self._fit_on_device(graph.name, [], outs)

    # ------------------------------------------------------------------------------------------
    # Whole-step capture: a recorded command list, replayed (libremote.capture_step)
    # ------------------------------------------------------------------------------------------
    def _define_program(self, command: list[Any], frames: list[Any]) -> None:
        codec.check(len(command) in (3, 4) and isinstance(command[1], int) and isinstance(command[2], list)
                       and (len(command) == 3 or isinstance(command[3], dict)),
                       "PROGRAM takes [PROGRAM, id, commands, options?]")
        program_id, commands = command[1], command[2]
        options = command[3] if len(command) == 4 else {}
        self._release_graph_pool(program_id)  # a redefined (or dropped) step lets go of the old one's
        if options.get("drop"):
            self._programs.pop(program_id, None)
            return
        if program_id not in self._programs and len(self._programs) >= programs.MAX_PROGRAMS_PER_SESSION:
            raise CommandError(ErrorKind.OP, "capture", f"a session may keep at most "
                               f"{programs.MAX_PROGRAMS_PER_SESSION} captured steps")
        program = programs.define(commands)
        if not options.get("ran", True):
            # Recorded without running (torch.cuda.graph). The ops it names for the first time
            # are defined now, as running them would have: the client names them by id alone
            # from here on (and a refused op fails the capture).
            for recorded in program.commands:
                if recorded[0] == Cmd.OP and type(recorded[1]) is list:
                    self._op_entry(recorded[1])
            self._allocate_placeholders(program, options.get("placeholders", []))
            # Like a CUDA graph's memory pool, the step's results belong to the step for as long
            # as it is defined: another captured step may read them (make_graphed_callables'
            # backward reads what the forward left), so a client's FREE waits for the step to go.
            for handle in program.created:
                self._graph_pool[handle] = program_id
        self._programs[program_id] = program

    def _release_graph_pool(self, program_id: int) -> None:
        """The step ``program_id`` goes: drop the results it held that the client freed."""
        for handle in [h for h, owner in self._graph_pool.items() if owner == program_id]:
            del self._graph_pool[handle]
            if handle in self._freed_in_graph_pool:
                self._freed_in_graph_pool.discard(handle)
                self._drop(handle)

    def _allocate_placeholders(self, program: programs.Program, placeholders: Any) -> None:
        """The results of a step recorded without running that the client holds, allocated now
        with their layouts and left uninitialised, as a CUDA graph's outputs are between capture
        and first replay: the client may size things on them (``torch.empty_like(out)``, as
        ``make_graphed_callables`` does) and a later step may read them. Each replay writes
        into them (``_copy_into_previous``)."""
        codec.check(isinstance(placeholders, list) and len(placeholders) <= len(program.created),
                       "PROGRAM placeholders must be a list of the step's results")
        allocated_before = self.memory.allocated
        handles = []
        for entry in placeholders:
            codec.check(isinstance(entry, list) and len(entry) == 6 and isinstance(entry[1], torch.dtype),
                           "a placeholder is [handle made by the step, dtype, shape, stride, offset, device]")
            handle, dtype, shape, stride, offset, device = entry
            if type(handle) is not int or handle not in program.created or handle in self.tensors:
                continue  # not a result of this step: nothing to hold for it
            codec.check(isinstance(shape, list) and isinstance(stride, list) and len(shape) == len(stride)
                           and all(type(n) is int and n >= 0 for n in (*shape, *stride, offset)),
                           "a placeholder's shape, strides and offset are non-negative integers")
            span = offset + sum((size - 1) * step for size, step in zip(shape, stride) if size) + 1
            needed = span * dtype.itemsize
            if self._over_quota(needed):  # checked before allocating
                message = self._quota_message(allocated_before, self.memory.allocated - allocated_before + needed)
                for made in handles:
                    self._drop(made)
                raise CommandError(ErrorKind.OOM, "capture", message)
            # Zeroed, not left uninitialised: the block may hold another tenant's freed bytes.
            self._store(handle, torch.zeros((span,), dtype=dtype, device=self._device(device))
                        .as_strided(shape, stride, offset))
            handles.append(handle)

    def _replay(self, command: list[Any], frames: list[Any]) -> None:
        codec.check(len(command) == 2, "REPLAY takes [REPLAY, id]")
        program = self._programs.get(command[1]) if isinstance(command[1], int) else None
        codec.check(program is not None, lambda: f"captured step {codec.brief(command[1])} was never defined in this session")
        # A step is captured once the session's compiles are done, so that the capture records
        # the compiled code, not the interpreter's, for the rest of its life.
        compiling = self._compiler is not None and self._compiler.pending > 0
        if self._cuda_graphs is not None and not compiling:
            self._cuda_graphs.replay_program(command[1], program, lambda: self._run_program(program, frames), self)
        else:
            self._run_program(program, frames)

    def _run_program(self, program: programs.Program, frames: list[Any]) -> None:
        """Run a captured step's commands. Its results go into the tensors the last run made, so
        a replay updates the step's outputs in place (views of them too), as a CUDA graph's
        replay does; a result the client has freed since stays freed. (Under a CUDA graph
        capture, those copies are recorded too: each launch writes the same tensors.)

        While the step runs, the last run's results leave the handle table (the step makes new
        tensors under the same handles) but stay charged to the session and, under
        oversubscription, tracked by the device's memory manager: they are real memory until the
        new results are copied into them, so the quota, the peak figures and the device budget
        all see them (and the memory manager may spill them meanwhile)."""
        previous: dict[int, torch.Tensor] = {}
        held_keys: list[int] = []
        for handle in program.created:
            tensor = self.tensors.pop(handle, None)
            if tensor is None:
                self._failed.pop(handle, None)
            else:
                previous[handle] = tensor
                held_keys.append(self._storage_keys.pop(handle))
        try:
            self._run_recorded(program, frames)
            self._copy_into_previous(program, previous)
        finally:
            for key in held_keys:
                self.memory.release(key)

    def _run_recorded(self, program: programs.Program, frames: list[Any]) -> None:
        for position, recorded in enumerate(program.commands):
            self._program_at = (program, position)
            try:
                self._handlers[recorded[0]](recorded, frames)
            except CommandError as exc:
                for handle in program.created:
                    if handle not in self.tensors:
                        self._failed.setdefault(handle, f"the captured step failed in {exc.op}: {exc.message}")
                exc.op = f"{exc.op or self._describe(recorded)} (in a captured step)"
                if exc.kind == ErrorKind.HANDLE:
                    exc.message += ("; a tensor the captured step uses was freed since it was recorded: keep "
                                    "the model, optimizer and tensors the step uses alive while replaying it")
                raise
            finally:
                self._program_at = None

    def _copy_into_previous(self, program: programs.Program, previous: dict[int, torch.Tensor]) -> None:
        """Copy a replay's new results into the last run's tensors and put those back under
        their handles (a result whose layout changed keeps the new tensor)."""
        pairs = [(handle, self.tensors[handle], previous[handle]) for handle in program.created
                 if handle in self.tensors and handle in previous]
        if pairs and self.memory.managed:
            # Both sides of every copy on the device first: a spilled storage has no bytes, and
            # reading or writing one is a crash, not an error.
            self._make_resident("captured step", [t for _, new, old in pairs for t in (new, old)])
        for handle in program.created:
            new, old = self.tensors.get(handle), previous.get(handle)
            if new is None:
                continue
            if old is None:
                self._drop(handle)
            elif (old.shape, old.stride(), old.dtype, old.device) == (new.shape, new.stride(), new.dtype, new.device):
                old.copy_(new)
                self._drop(handle)
                self._store(handle, old)

    # ------------------------------------------------------------------------------------------
    # Oversubscription: keep what an op touches resident, and the device within its budget
    # ------------------------------------------------------------------------------------------
    def _device_memory_of(self, tensor: torch.Tensor) -> DeviceMemory | None:
        return self.device_memories[self._index_of(tensor.device)]

    def _prefetch(self) -> None:
        """Before a slice: bring back what the queued commands will need (DeviceMemory.prefetch)."""
        for device_memory in {id(dm): dm for dm in self.device_memories if dm is not None}.values():
            device_memory.prefetch(self)

    def _make_resident(self, what: str, tensors: list[torch.Tensor]) -> list[StorageRecord]:
        """Restore the storages these tensors use (spilled ones come back first)."""
        records = list({id(r): r for t in tensors for r in self.memory.records_of(t)}.values())
        try:
            for device_memory in {id(r.device_memory): r.device_memory for r in records}.values():
                device_memory.ensure_resident([r for r in records if r.device_memory is device_memory])
        except SpillExhausted as exc:
            raise CommandError(ErrorKind.OOM, what, str(exc)) from None
        return records

    def _foreach_in_slices(self, entry: op_policy.OpEntry, args: list[Any], kwargs: dict[str, Any],
                           outs: Any) -> tuple[Any] | None:
        """Run a foreach op whose operands (and results) do not fit the device budget together on
        slices of its lists that do, storing each slice's results as it goes so that the budget
        sees them (server/foreach_chunks.py). Returns ``(result,)``, or None when not split."""
        lists = list(foreach_chunks.tensor_lists(args, kwargs))
        device_memory = self._device_memory_of(lists[0][0]) if lists else None
        if device_memory is None or device_memory.budget is None:
            return None
        returns_list = bool(entry.overload._schema.returns)
        length = len(lists[0])
        records_at = [list({id(r): r for r in (self.memory.record_of(lst[i]) for lst in lists if i < len(lst))
                            if r is not None}.values()) for i in range(length)]
        # Bytes per index: its operands, and for ops that return tensors, room for the largest.
        per_index = [sum(r.nbytes for r in records) + (max((r.nbytes for r in records), default=0) if returns_list else 0)
                     for records in records_at]
        if sum(per_index) <= device_memory.budget:
            return None  # it fits: one op moves less than several slices would
        ranges = foreach_chunks.slices(args, kwargs, per_index, device_memory.budget)
        handles = outs[0] if returns_list and isinstance(outs, list) and outs and isinstance(outs[0], list) else None
        if ranges is None or (returns_list and (handles is None or len(handles) != length)):
            return None

        def spilled_bytes(span: tuple[int, int]) -> int:
            spilled = {id(r): r for records in records_at[span[0]:span[1]] for r in records if not r.resident}
            return sum(r.nbytes for r in spilled.values())

        # Slices already resident first: the last op left its last slices on the device, and
        # starting there (not at index 0, which it spilled first) moves the least.
        ranges.sort(key=spilled_bytes)
        results: list[Any] = [None] * length
        for start, stop in ranges:
            slice_args, slice_kwargs = foreach_chunks.arguments(args, kwargs, start, stop)
            records = self._make_resident(entry.name, values.tensors_in(slice_args, slice_kwargs))
            produced = self._call(entry, slice_args, slice_kwargs, records)
            if handles is not None:
                results[start:stop] = produced
                for handle, tensor in zip(handles[start:stop], produced):
                    if handle is not None:
                        self._store(handle, tensor)
                self._fit_on_device(entry.name, records, [handles[start:stop]])
        self.ops_executed += 1
        return (results if returns_list else None,)

    def _call(self, entry: op_policy.OpEntry, args: list[Any], kwargs: dict[str, Any],
              inputs: Any) -> Any:
        """Run the op; with oversubscription on, a real out-of-memory error from the device makes
        room (evicting other storages, more each time) and retries."""
        if not self.memory.managed:
            return entry.call(*args, **kwargs)
        device_memory = self.device_memories[self._index_of(values.device_of(args, kwargs))]
        if device_memory is None:
            return entry.call(*args, **kwargs)
        try:
            return device_memory.retrying_oom(lambda: entry.call(*args, **kwargs), protect=inputs)
        except SpillExhausted as exc:
            raise CommandError(ErrorKind.OOM, entry.name, str(exc)) from None

    def _fit_on_device(self, what: str, inputs: list[StorageRecord], outs: Any) -> None:
        """New outputs are resident: evict others to get back within the device budget, or undo
        the op and raise out-of-memory when host RAM cannot take the overflow either."""
        outputs = [self.tensors[h] for h in values.flatten_handles(outs) if isinstance(h, int) and h in self.tensors]
        records = inputs + [r for t in outputs for r in self.memory.records_of(t)]
        try:
            for device_memory in {id(dm): dm for dm in self.device_memories if dm is not None}.values():
                device_memory.fit(protect=records)
                device_memory.touch(records)
        except SpillExhausted as exc:
            for handle in values.flatten_handles(outs):
                if isinstance(handle, int):
                    self._drop(handle)
                    self._failed[handle] = f"{what} failed: {exc}"
            raise CommandError(ErrorKind.OOM, what, str(exc)) from None

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
        codec.check(values.is_dense_layout(shape, stride), lambda: f"PUT strides {stride} do not lay out {shape} densely")
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
                and not tensor.is_conj() and not tensor.is_neg() and values.is_dense(tensor, any_offset=True)):
            # ZeroMQ sends the bytes after this returns. Nothing of this session runs before its
            # client has the whole reply (FETCH ends the batch, and the client sends nothing
            # while it waits), and no other session can name this tensor: no copy needed. (Not
            # with oversubscription: another session's work may spill the storage meanwhile.)
            host = tensor
        else:
            # A fresh host copy (preserve_format keeps the strides of dense tensors).
            host = tensor.to("cpu", copy=True)
            if not values.is_dense(host):
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
        if self.stream is not None:
            event = torch.cuda.Event(enable_timing=True)
            event.record(self.stream)
        else:
            event = time.perf_counter()
        self._events[command[1]] = event
        while len(self._events) > _MAX_EVENTS:
            self._events.popitem(last=False)

    def _elapsed(self, command: list[Any], frames: list[Any]) -> float:
        codec.check(len(command) == 3, "ELAPSED takes [ELAPSED, start, end]")
        try:
            start, end = self._events[command[1]], self._events[command[2]]
        except (KeyError, TypeError):
            raise CommandError(ErrorKind.OP, "Event.elapsed_time", "both events must be recorded first") from None
        if isinstance(start, float):
            return (end - start) * 1000.0
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

    def compile_counts(self) -> dict[str, int]:
        """Graphs compiled for this session (``--graph-compiler``), compiles still running, and
        the seconds the finished ones took."""
        return {"graphs_compiled": self._compiler.compiles if self._compiler else 0,
                "graph_compiles_pending": self._compiler.pending if self._compiler else 0,
                "graph_compile_s": self._compiler.compile_s if self._compiler else 0.0}

    def memory_stats(self) -> dict[str, int]:
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
