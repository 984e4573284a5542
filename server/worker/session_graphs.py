"""Graph mode and recorded steps on a session: GRAPH/RUN_GRAPH (graphs defined once, run on
handles: graphs.py, cuda_graphs.py, compiled_graphs.py) and PROGRAM/REPLAY (a recorded step, run
again with one command: programs.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from libremote_wire import codec
from libremote_wire.codec import ProtocolError
from libremote_wire.messages import Cmd, ErrorKind

from . import graphs, op_policy, programs, values, zeroing
from .errors import CommandError

if TYPE_CHECKING:
    from .compiled_graphs import GraphCompiler
    from .cuda_graphs import GraphCapture
    from .memory import MemoryAccount
    from .residency import StorageRecord

log = logging.getLogger("libremote.server")


class GraphsMixin:
    """The GRAPH, RUN_GRAPH, PROGRAM and REPLAY handlers of :class:`~.session.Session`.

    A mixin: state lives on the session. The session's state and the methods of the session and
    its other mixins that these handlers use are declared below for the type checker only
    (``if TYPE_CHECKING``): they name what this mixin relies on, and mypy checks that Session
    defines each with the same type, while at run time the class body holds none of them, so
    nothing here shadows the real ones through the MRO.
    """

    if TYPE_CHECKING:
        # Session state (session.py).
        memory: MemoryAccount
        tensors: dict[int, torch.Tensor]
        _storage_keys: dict[int, Any]
        _failed: dict[int, str]
        _graphs: dict[int, graphs.Graph]
        _programs: dict[int, programs.Program]
        _graph_pool: dict[int, int]
        _freed_in_graph_pool: set[int]
        _program_at: tuple[programs.Program, int] | None
        _handlers: dict[int, Callable[[list[Any], list[Any]], Any]]
        _cuda_graphs: GraphCapture | None
        _compiler: GraphCompiler | None
        graphs_defined: int
        graph_runs: int
        step_replays: int

        # Session's methods (session.py).
        def _store(self, handle: Any, tensor: Any) -> None: ...
        def _drop(self, handle: int) -> None: ...
        def _device(self, index: Any) -> torch.device: ...
        def _resolve(self, value: Any, depth: int = 0) -> Any: ...
        def _describe(self, command: list[Any]) -> str: ...
        def _op_entry(self, ref: Any) -> op_policy.OpEntry: ...
        def _invoke(self, entry: op_policy.OpEntry, args: list[Any], kwargs: dict[str, Any]) -> tuple[Any, Any]: ...

        # QuotaMixin's (session_quota.py).
        def _over_quota(self, extra: int = 0) -> bool: ...
        def _quota_message(self, in_use: int, needed: int) -> str: ...
        def _refuse_over_quota(self, what: str, allocated_before: int, outs: Any, grown: Any = ()) -> None: ...

        # ResidencyMixin's (session_residency.py).
        def _make_resident(self, what: str, tensors: list[torch.Tensor]) -> list[StorageRecord]: ...
        def _fit_on_device(self, what: str, inputs: list[StorageRecord], outs: Any) -> None: ...

    # ------------------------------------------------------------------------------------------
    # Graph mode: graphs defined once, run on handles (see server/graphs.py)
    # ------------------------------------------------------------------------------------------
    def _define_graph(self, command: list[Any], frames: list[Any]) -> None:
        codec.check(len(command) == 5, "GRAPH takes [GRAPH, id, input count, nodes, outputs]")
        _, graph_id, input_count, nodes, outputs = command
        codec.check(isinstance(graph_id, int) and not isinstance(graph_id, bool), "graph id must be an integer")
        self.graphs_defined += 1
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
        if graph is None:  # (codec.check's ProtocolError, written out: the type checker narrows it)
            raise ProtocolError(f"graph {codec.brief(graph_id)} was never defined in this session")
        self.graph_runs += 1
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

        execute: Callable[[list[Any]], list[Any]] = interpret
        settled = True
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
        handles: list[int] = []
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
        if program is None:  # (codec.check's ProtocolError, written out: the type checker narrows it)
            raise ProtocolError(f"captured step {codec.brief(command[1])} was never defined in this session")
        self.step_replays += 1
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
