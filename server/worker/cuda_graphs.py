"""CUDA-graph replay of compiled graphs and captured steps on a GPU daemon.

An interpreted graph costs host time for every node (resolve, dispatch, launch: 15-20 µs each on
the H100 box), which for a GPT-2-small training step is more than the GPU work itself. So once a
graph has run :data:`WARMUP_RUNS` times on a session's CUDA stream, the daemon captures it into a
``torch.cuda.CUDAGraph`` and from then on replays it: one launch per call.

A CUDA graph reads and writes fixed addresses, and clients free and reuse tensors at will. What
keeps replay exact:

* **Inputs.** The graph is captured on the call's own input tensors, and the capture keeps them
  alive (so their memory cannot be handed to anything else). A later call whose input is the same
  storage at the same place costs nothing: parameters, optimizer state, and activations another
  replayed graph produced. A different tensor is copied into the captured one first, but only
  when nothing except captured graphs still holds that one (``torch._C._storage_Use_Count``
  against :attr:`GraphCapture.held`); inputs the graph writes are copied back afterwards.
* **Outputs** live in the graph's private memory pool, which the next replay overwrites. Small
  ones (up to :data:`CLONED_OUTPUT_BYTES`: losses, statistics) are cloned after each replay.
  Large ones (activations, gradients) are handed out as they are. If a client still holds one
  when the next call comes, that call is interpreted instead; a graph whose outputs keep
  outliving the next call is captured again, into a fresh pool, and clones all its outputs.
* **Random ops** draw from the session's generator, registered with the graph, so a replay
  advances it exactly as the interpreted ops would: the numbers match eager. Ops that draw from
  the device's default generator (dropout) are captured against it, and the replay runs with the
  session's state swapped in, as the interpreter does for each such op.
* Anything else that does not fit leaves the graph interpreted, which is always correct: an input
  on another device, an op that needs the host or resizes memory, a capture that fails, inputs
  that differ every call.

**Captured steps** (``libremote.capture_step``: a PROGRAM of recorded commands) follow CUDA graphs'
contract already, so after :data:`WARMUP_RUNS` interpreted replays the whole step (forward,
backward, optimizer) is captured as one CUDA graph, and a REPLAY is one launch. Every replay,
interpreted or launched, writes the step's results into the same tensors (so the client's views of
them follow); the capture records those copies too. The tensors the step reads are kept alive by
the capture and checked before every launch: if one was freed or replaced, the step is
interpreted from then on (and fails as the interpreter does when a tensor is gone). With
``--emulate-cuda-graphs`` the same bookkeeping runs, with interpreted replays in place of launches.

Sessions under residency management (``--device-memory``/``--host-spill``) are not captured: the
pool lives outside the device budget the manager enforces, and spilling moves storages.
The pool's intermediates are not charged to the session's quota either (an interpreted run's are,
while they live: ``MemoryAccount.hold``; a captured graph keeps its peak reserved for as long as it
lives). So
that a finished model does not pin its memory, the daemon's housekeeping drops the captures whose
parameters (the inputs a graph was last called with as the very tensors it was captured on) or
whose step's tensors the client has freed (:meth:`GraphCapture.reclaim`).

Why one module of this size: capture, replay and the bookkeeping of what a replay may overwrite
are one protocol with one invariant (addresses fixed while a client may still read them).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch

from libremote_wire.codec import DeviceRef, GeneratorRef
from libremote_wire.messages import Cmd

from . import graphs

log = logging.getLogger("libremote.server")

#: Interpreted runs before a graph is captured (they also warm up cuBLAS/cuDNN lazy state).
WARMUP_RUNS = 2
#: Outputs up to this size are cloned after each replay, so clients may keep them.
CLONED_OUTPUT_BYTES = 1 << 20
#: Calls in a row that outlived outputs forced to be interpreted before a graph clones them all.
SURVIVOR_CALLS_BEFORE_CLONING = 2
#: Calls in a row that could not replay before a capture is dropped (its pool freed).
FALLBACKS_BEFORE_DROPPING = 16

#: Ops that wait on the device or size their result by its values: never captured.
HOST_SYNCING_OPS = frozenset({
    "_local_scalar_dense", "item", "nonzero", "nonzero_static", "masked_select", "unique", "_unique", "_unique2",
    "unique_consecutive", "unique_dim", "equal", "is_nonzero", "bincount", "histc", "repeat_interleave",
})
#: Overloads that sync although other overloads of their op do not.
HOST_SYNCING_OVERLOADS = frozenset({"aten::where", "aten::where.default"})


def _key(tensor: torch.Tensor) -> int:
    key: int = tensor.untyped_storage()._cdata  # (the storage's address: torch leaves _cdata untyped)
    return key


def _use_count(key: int) -> int:
    """References to a storage other than its Python object: one per tensor on it. (``_key`` made
    the Python object exist; once it does, it holds one reference for the storage's whole life.)"""
    return torch._C._storage_Use_Count(key) - 1


def _layout(tensor: torch.Tensor) -> tuple[Any, ...]:
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride(),
            tensor.dtype)


def _storage_groups(tensors: list[torch.Tensor]) -> tuple[int, ...]:
    """Which inputs share a storage, as first-occurrence indices: replaying needs the same sharing."""
    first: dict[int, int] = {}
    return tuple(first.setdefault(_key(t), i) for i, t in enumerate(tensors))


def _clone_outputs(outputs: list[Any]) -> list[Any]:
    """Copies of ``outputs`` in ordinary memory; outputs that share a storage still share one."""
    copies: dict[int, torch.UntypedStorage] = {}
    cloned = []
    for output in outputs:
        if not isinstance(output, torch.Tensor):
            cloned.append(output)
            continue
        storage = output.untyped_storage()
        copy = copies.get(storage._cdata)
        if copy is None:
            clone: Callable[[], torch.UntypedStorage] = storage.clone  # (unannotated in torch)
            copy = copies[storage._cdata] = clone()
        cloned.append(torch.empty(0, dtype=output.dtype, device=output.device).set_(
            copy, output.storage_offset(), output.shape, output.stride()))
    return cloned


def written_inputs(graph: graphs.Graph) -> frozenset[int]:
    """Inputs the graph writes, directly or through views of them (schema alias annotations)."""
    roots: dict[int, frozenset[int]] = {i: frozenset((i,)) for i in range(graph.input_count)}
    written: set[int] = set()
    for position, node in enumerate(graph.nodes):
        slot = graph.input_count + position
        if node.entry is None:  # getitem: an element of a result aliases what the result does
            roots[slot] = roots.get(node.args[0].index, frozenset())
            continue
        schema = node.entry.overload._schema
        aliased: set[int] = set()
        named = dict(zip((a.name for a in schema.arguments), node.args))
        named.update(node.kwargs)
        for argument in schema.arguments:
            if argument.alias_info is None or argument.name not in named:
                continue
            reached: set[int] = set()
            graphs.visit(named[argument.name], lambda ref: reached.update(roots.get(ref.index, ())))
            aliased |= reached
            if argument.alias_info.is_write:
                written |= reached
        if any(ret.alias_info is not None for ret in schema.returns):
            roots[slot] = frozenset(aliased)
    return frozenset(written)


def refusal(graph: graphs.Graph) -> str | None:
    """Why ``graph`` can never be captured, or None."""
    for node in graph.nodes:
        if node.entry is None:
            continue
        base = node.entry.overload._schema.name.split("::")[-1]
        if base in HOST_SYNCING_OPS or node.entry.name in HOST_SYNCING_OVERLOADS:
            return f"{node.entry.name} waits on the device"
        if node.entry.resized_arguments:
            return f"{node.entry.name} resizes memory"
        if any(isinstance(v, DeviceRef) and v.index != 0 for v in (*node.args, *node.kwargs.values())):
            return f"{node.entry.name} names another device"
    return None


@dataclass
class _Captured:
    replayable: Any  # torch.cuda.CUDAGraph, or its CPU emulation
    inputs: list[torch.Tensor]  # the tensors captured on (kept alive)
    input_layouts: list[tuple[Any, ...]]
    input_groups: tuple[int, ...]
    outputs: list[Any]  # what the capture produced: tensors in the pool or aliasing an input
    output_input: list[int | None]  # the input an output aliases, if any
    cloned: list[bool]  # outputs cloned after each replay
    handed_out: list[int] = field(default_factory=list)  # pool storages given out by the last replay
    #: Inputs the last replay passed as the very tensors captured on (parameters, state): when
    #: the client frees one of those, the model is gone and the capture only holds memory.
    #: (Unknown until a call after the capture: a batch looks just like a parameter at first.)
    static_inputs: set[int] = field(default_factory=set)

    @property
    def aliased_inputs(self) -> set[int]:
        return {index for index in self.output_input if index is not None}


class _EmulatedGraph:
    """What a CUDA graph does to memory, on the CPU backend (``--emulate-cuda-graphs``): each
    replay computes on the captured inputs and overwrites the captured outputs in place. It lets
    the test suite hold the replay rules (copies in and back, outputs kept past the next call,
    aliases) to exact results on machines without a GPU."""

    def __init__(self, execute: Callable[[list[Any]], list[Any]], inputs: list[Any], outputs: list[Any]) -> None:
        self._execute, self._inputs, self._outputs = execute, inputs, outputs

    def replay(self) -> None:
        fresh = self._execute(self._inputs)
        input_storages = {_key(t) for t in self._inputs}
        for static, value in zip(self._outputs, fresh):
            if isinstance(static, torch.Tensor) and _key(static) not in input_storages:
                static.copy_(value)


def _program_reads_changed(captured: _CapturedProgram, tensors: dict[int, torch.Tensor]) -> str | None:
    """Why a captured step can no longer be launched: a tensor it reads is gone or moved."""
    for handle, (tensor, _, key, address) in captured.reads.items():
        current = tensors.get(handle)
        if current is not tensor:
            return "a tensor the step reads was freed or replaced since it was captured"
        storage = current.untyped_storage()
        if storage._cdata != key or storage.data_ptr() != address:
            return "a tensor the step reads was moved since it was captured"
    return None


def _plain_aliases(outputs: list[Any]) -> list[Any]:
    """``outputs`` as tensors of their own on the same memory. A view keeps its base tensor alive
    from C++ (``_base``), which counts on the storage where ``held`` cannot see it; a detached
    alias keeps nothing but the storage."""
    return [output.detach() if isinstance(output, torch.Tensor) else output for output in outputs]


def _pool_keys(captured: _Captured) -> set[int]:
    """Storages of a capture's outputs that live in its pool (not aliases of its inputs)."""
    return {_key(output) for output, aliased in zip(captured.outputs, captured.output_input)
            if isinstance(output, torch.Tensor) and aliased is None}


def _distinct_tensors(captured: _Captured) -> list[torch.Tensor]:
    """The tensor objects a capture keeps: each holds one reference on its storage, however
    often it appears (an input returned as an output is one object)."""
    seen: dict[int, torch.Tensor] = {}
    for value in (*captured.inputs, *captured.outputs):
        if isinstance(value, torch.Tensor):
            seen.setdefault(id(value), value)
    return list(seen.values())


@dataclass
class _CapturedProgram:
    cuda_graph: Any  # None in the emulation
    #: handle -> (the session's tensor, an alias keeping its memory alive, storage key, address)
    reads: dict[int, tuple[torch.Tensor, torch.Tensor, int, int]]
    written: list[torch.Tensor]  # aliases of the step's results, which every launch writes


class _ProgramState:
    def __init__(self, program: Any) -> None:
        self.program = program
        self.runs = 0
        self.captured: _CapturedProgram | None = None
        self.disabled: str | None = (
            "an op draws from an explicit torch.Generator (only the session's is registered with a graph)"
            if _names_explicit_generator(program) else None)


def _names_explicit_generator(program: Any) -> bool:
    """Whether a step's ops name one of the program's own generators (``torch.Generator("cuda")``):
    a replay of a CUDA graph would not advance it, so such a step stays interpreted."""
    for command in program.commands:
        if command[0] == Cmd.OP and len(command) > 3:
            arguments = command[2] if isinstance(command[2], list) else []
            keywords = command[3].values() if isinstance(command[3], dict) else ()
            if any(type(value) is GeneratorRef for value in (*arguments, *keywords)):
                return True
    return False


class _GraphState:
    def __init__(self, graph: graphs.Graph) -> None:
        self.graph = graph
        self.runs = 0
        self.captured: _Captured | None = None
        self.disabled: str | None = refusal(graph)
        self.written = written_inputs(graph)
        self.uses_default_generator = any(n.entry is not None and n.entry.seeded_without_generator for n in graph.nodes)
        self.clone_all = False
        self.survivor_calls = 0
        self.fallbacks = 0


class GraphCapture:
    """One session's CUDA graphs: captures, replays, and the references captures hold.

    Two entry points: :meth:`run` for a compiled graph (the session passes the graph, its inputs
    and how to run it without a CUDA graph, and gets the outputs, from a replay when it can),
    and :meth:`replay_program` for a captured step."""

    def __init__(self, device: torch.device, generator: torch.Generator | None,
                 session_rng: Callable[[], AbstractContextManager[None]]) -> None:
        self.device = device
        #: On the CPU backend: replay by the same rules, with :class:`_EmulatedGraph` standing in.
        self.emulated = device.type != "cuda"
        self.generator = generator
        self.session_rng = session_rng  # runs the default generator with the session's state
        #: True while a capture records ops: the session must not swap generator states then.
        self.capturing = False
        #: True while a captured step is captured: its graph runs are interpreted into it.
        self.capturing_program = False
        self._programs: dict[int, _ProgramState] = {}
        #: storage key -> how many tensors captured graphs hold on it (inputs kept alive, outputs).
        self.held: collections.Counter[int] = collections.Counter()
        #: storage keys of captured graphs' own outputs (their memory pools).
        self.pool_keys: collections.Counter[int] = collections.Counter()
        self._states: dict[int, _GraphState] = {}
        self.captures = 0
        self.replays = 0
        #: Why calls were interpreted instead of replayed, with counts (``libremote.session_stats``).
        self.interpreted: collections.Counter[str] = collections.Counter()

    def run(self, graph_id: int, graph: graphs.Graph, inputs: list[Any],
            interpret: Callable[[list[Any]], list[Any]]) -> list[Any]:
        """``interpret`` runs the graph on given inputs without a CUDA graph (node by node, or
        inductor's code for it): what a capture records, and what runs when a call cannot replay."""
        if self.capturing_program:
            return interpret(inputs)
        state = self._states.get(graph_id)
        if state is None or state.graph is not graph:  # new, or redefined under the same id
            if state is not None:
                self._drop(state, "redefined")
            state = self._states[graph_id] = _GraphState(graph)
        if state.disabled:
            return self._interpret(graph_id, state.disabled, interpret, inputs)
        if state.captured is None:
            state.runs += 1
            if state.runs <= WARMUP_RUNS:
                return self._interpret(graph_id, "warming up", interpret, inputs)
            reason = graphs.input_refusal(inputs, self.device)
            if reason:
                state.disabled = reason
                return self._interpret(graph_id, reason, interpret, inputs)
            try:
                captured, ran = self._capture(state, inputs, interpret)
            except Exception as exc:  # the graph stays interpreted; the call itself must not fail
                if not self.emulated:
                    self._after_failed_capture()
                state.disabled = f"capture failed: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}"
                log.warning("graph %d stays interpreted: %s", graph_id, state.disabled)
                return self._interpret(graph_id, state.disabled, interpret, inputs)
            return self._replay(state, captured, inputs, [], ran=ran)
        plan = self._plan(state, state.captured, inputs)
        if isinstance(plan, str):
            state.fallbacks += 1
            if state.fallbacks >= FALLBACKS_BEFORE_DROPPING:
                self._drop(state, f"{FALLBACKS_BEFORE_DROPPING} calls in a row could not replay ({plan})")
            return self._interpret(graph_id, plan, interpret, inputs)
        state.fallbacks = 0
        state.captured.static_inputs = set(range(len(inputs))).difference(plan)
        return self._replay(state, state.captured, inputs, plan)

    def _interpret(self, graph_id: int, why: str, interpret: Callable[[list[Any]], list[Any]], inputs: list[Any]) -> list[Any]:
        self.interpreted[why] += 1
        log.debug("graph %d (%d inputs) interpreted: %s", graph_id, len(inputs), why)
        return interpret(inputs)

    def close(self) -> None:
        for state in self._states.values():
            self._release(state)
        self._states.clear()
        self._programs.clear()

    @property
    def live(self) -> int:
        """Captures alive now (each holds its inputs and its memory pool)."""
        return (sum(1 for state in self._states.values() if state.captured is not None)
                + sum(1 for state in self._programs.values() if state.captured is not None))

    def reclaim(self, tensors: dict[int, torch.Tensor]) -> None:
        """Drop the captures of models the client has let go of, so their memory returns: a
        graph whose captured-on parameters only captures still hold, a step whose tensors are
        gone. (Called from the daemon's housekeeping; a later call captures again if needed.)"""
        for state in self._states.values():
            captured = state.captured
            if captured is None:
                continue
            for index in captured.static_inputs:
                key = _key(captured.inputs[index])
                # Another graph's output (activations passed to a backward graph) is not the
                # client's: between steps only captures hold it, and that is normal.
                if key not in self.pool_keys and _use_count(key) <= self.held[key]:
                    self._release(state)
                    state.runs = 0  # if it is called again, it warms up and is captured anew
                    break
        for program_state in self._programs.values():
            if program_state.captured is not None and _program_reads_changed(program_state.captured, tensors):
                program_state.captured = None
                program_state.disabled = "a tensor the step reads was freed or replaced since it was captured"

    # ------------------------------------------------------------------------------------------
    # Captured steps (PROGRAM/REPLAY)
    # ------------------------------------------------------------------------------------------
    def replay_program(self, program_id: int, program: Any, run: Callable[[], None], session: Any) -> None:
        """Replay a captured step: ``run()`` interprets it (the session's own replay, results in
        place); after :data:`WARMUP_RUNS` of those, ``run()`` under capture records it, and the
        step is launched as one CUDA graph from then on."""
        state = self._programs.get(program_id)
        if state is None or state.program is not program:
            state = self._programs[program_id] = _ProgramState(program)
        if state.disabled or len(session.devices) > 1:
            return run()  # a step on several devices: work off the captured device would run, not record
        if state.captured is not None:
            changed = _program_reads_changed(state.captured, session.tensors)
            if changed is None:
                if self.emulated:
                    run()  # what a launch does to memory: the results, in place
                else:
                    with self.session_rng():
                        state.captured.cuda_graph.replay()
                self.replays += 1
                return None
            log.info("captured step %d is interpreted from now on: %s", program_id, changed)
            state.captured, state.disabled = None, changed
            self.interpreted[changed] += 1
            return run()
        state.runs += 1
        if state.runs <= WARMUP_RUNS:
            self.interpreted["warming up"] += 1
            return run()
        if self.emulated:
            run()  # the emulation's capture runs the step, in place like every replay
            cuda_graph = None
        else:
            cuda_graph = self._capture_program(program_id, state, run)
            if cuda_graph is None:
                return None
        reads = {}
        for handle in program.reads:
            tensor = session.tensors[handle]  # the capture ran, so every one of them resolved
            storage = tensor.untyped_storage()
            reads[handle] = (tensor, tensor.detach(), storage._cdata, storage.data_ptr())
        # The step's results: each launch writes them, so their memory must outlive their handles.
        written = [session.tensors[handle].detach() for handle in program.created if handle in session.tensors]
        state.captured = _CapturedProgram(cuda_graph, reads, written)
        self.captures += 1
        if cuda_graph is not None:
            with self.session_rng():
                cuda_graph.replay()
        self.replays += 1
        return None

    def _capture_program(self, program_id: int, state: _ProgramState, run: Callable[[], None]) -> Any:
        """Capture a step's commands as a CUDA graph and return it. When the capture fails, the
        step has been run interpreted instead and the result is None."""
        cuda_graph = torch.cuda.CUDAGraph()
        if self.generator is not None:
            cuda_graph.register_generator_state(self.generator)
        self.capturing = self.capturing_program = True
        failure: Exception | None = None
        try:
            cuda_graph.capture_begin(capture_error_mode="thread_local")
            try:
                run()
            finally:
                cuda_graph.capture_end()
        except Exception as exc:
            failure = exc
        finally:
            self.capturing = self.capturing_program = False
        if failure is None:
            return cuda_graph
        reason = f"capture failed: {str(failure).splitlines()[0][:200] if str(failure) else type(failure).__name__}"
        log.warning("captured step %d stays interpreted: %s", program_id, reason)
        self._after_failed_capture()
        state.disabled = reason
        self.interpreted[reason] += 1
        run()  # for real this time
        return None

    def _after_failed_capture(self) -> None:
        """A capture that failed leaves the generators it registered (the device's default one
        always, the session's when given) in capture mode: torch ends that mode in
        ``capture_end`` only after the capture itself succeeded, and until it ends, eager random
        ops stop advancing the generator. A small capture that succeeds ends it."""
        try:
            reset = torch.cuda.CUDAGraph()
            if self.generator is not None:
                reset.register_generator_state(self.generator)
            reset.capture_begin(capture_error_mode="thread_local")
            try:
                torch.zeros(1, device=self.device)
            finally:
                reset.capture_end()
        except Exception as exc:  # not seen; say so rather than fail the command that got here
            log.error("could not reset generators after a failed CUDA graph capture: %s", exc)

    def _capture(self, state: _GraphState, inputs: list[torch.Tensor],
                 interpret: Callable[[list[Any]], list[Any]]) -> tuple[_Captured, bool]:
        """Capture ``state.graph`` on ``inputs`` (into ``state.captured``); return the capture and
        whether it already ran the graph (the emulation does; a CUDA graph only records, and must be
        replayed)."""
        # Tensors of our own on the callers' storages: a client's handle to one stays a reference
        # of its own, which is how ``_plan`` sees that it is still held.
        inputs = [tensor.detach() for tensor in inputs]
        if self.emulated:
            outputs = _plain_aliases(interpret(inputs))
            replayable: Any = _EmulatedGraph(interpret, list(inputs), outputs)
        else:
            replayable = torch.cuda.CUDAGraph()
            if self.generator is not None and any(n.entry is not None and n.entry.takes_generator
                                                  for n in state.graph.nodes):
                replayable.register_generator_state(self.generator)
            # Capture on the session's stream (the current one while its commands run): kernels
            # are recorded, not run, and allocations come from the graph's private pool.
            replayable.capture_begin(capture_error_mode="thread_local")
            self.capturing = True
            try:
                outputs = interpret(inputs)
            except BaseException:
                try:
                    replayable.capture_end()
                except Exception:
                    pass
                raise
            finally:
                self.capturing = False
            replayable.capture_end()
            outputs = _plain_aliases(outputs)
        input_keys = {_key(t): i for i, t in enumerate(inputs)}
        output_input: list[int | None] = []
        cloned: list[bool] = []
        for output in outputs:
            if not isinstance(output, torch.Tensor):
                output_input.append(None)
                cloned.append(False)
                continue
            aliased = input_keys.get(_key(output))
            output_input.append(aliased)
            cloned.append(aliased is None and output.untyped_storage().nbytes() <= CLONED_OUTPUT_BYTES)
        captured = state.captured = _Captured(replayable, list(inputs), [_layout(t) for t in inputs],
                                              _storage_groups(inputs), outputs, output_input, cloned)
        for tensor in _distinct_tensors(captured):
            self.held[_key(tensor)] += 1
        for key in _pool_keys(captured):
            self.pool_keys[key] += 1
        self.captures += 1
        return captured, self.emulated

    def _plan(self, state: _GraphState, captured: _Captured, inputs: list[Any]) -> list[int] | str:
        """The inputs to copy in before replaying, or why this call must be interpreted."""
        refused = graphs.input_refusal(inputs, self.device)
        if refused:
            return refused
        if any(_use_count(key) > self.held[key] for key in captured.handed_out):
            # A client still holds an output of the last replay: replaying would overwrite it.
            state.survivor_calls += 1
            if state.survivor_calls >= SURVIVOR_CALLS_BEFORE_CLONING and not state.clone_all:
                # Capture again into a fresh pool, cloning every output from then on; the old
                # pool's blocks stay valid for as long as the tensors on them live.
                self._release(state)
                state.clone_all = True
                state.runs = WARMUP_RUNS
            return "an output of the last replay is still held"
        state.survivor_calls = 0
        copies = []
        for index, (value, layout) in enumerate(zip(inputs, captured.input_layouts)):
            if _layout(value) == layout and _key(value) == _key(captured.inputs[index]):
                continue
            target = captured.inputs[index]
            if value.shape != target.shape or value.dtype != target.dtype:
                return "an input changed shape or dtype"
            key = _key(target)
            if _use_count(key) > self.held[key]:
                # The captured tensor is still someone's: copying in would clobber it.
                return f"input {index} is a new tensor, and the captured one is still held"
            if value.stride() != target.stride() and index in captured.aliased_inputs:
                return f"output aliases input {index}, which is a new tensor laid out differently"
            copies.append(index)
        if copies and _storage_groups(inputs) != captured.input_groups:
            return "inputs share storage differently"
        return copies

    def _replay(self, state: _GraphState, captured: _Captured, inputs: list[Any], copies: list[int],
                ran: bool = False) -> list[Any]:
        for index in copies:
            captured.inputs[index].copy_(inputs[index])
        if ran:
            pass
        elif state.uses_default_generator and not self.emulated:
            with self.session_rng():
                captured.replayable.replay()
        else:
            captured.replayable.replay()
        for index in copies:
            if index in state.written:
                inputs[index].copy_(captured.inputs[index])
        self.replays += 1
        results: list[Any] = []
        handed_out: list[int] = []
        to_clone = []
        for position, output in enumerate(captured.outputs):
            if not isinstance(output, torch.Tensor):
                results.append(output)
            elif captured.cloned[position] or (state.clone_all and captured.output_input[position] is None):
                results.append(None)
                to_clone.append(position)
            elif (aliased := captured.output_input[position]) is not None and aliased in copies:
                # The same view of the caller's input as the capture's output is of the captured one.
                source, target = inputs[aliased], captured.inputs[aliased]
                results.append(source.as_strided(output.shape, output.stride(), source.storage_offset()
                                                 + output.storage_offset() - target.storage_offset()))
            else:
                results.append(output.detach())
                if captured.output_input[position] is None:
                    handed_out.append(_key(output))
        if to_clone:
            for position, copy in zip(to_clone, _clone_outputs([captured.outputs[p] for p in to_clone])):
                results[position] = copy
        captured.handed_out = handed_out
        return results

    def _drop(self, state: _GraphState, why: str) -> None:
        log.info("dropping a CUDA graph capture: %s", why)
        self._release(state)
        state.disabled = why

    def _release(self, state: _GraphState) -> None:
        captured, state.captured = state.captured, None
        if captured is None:
            return
        for tensor in _distinct_tensors(captured):
            key = _key(tensor)
            self.held[key] -= 1
            if self.held[key] <= 0:
                del self.held[key]
        for key in _pool_keys(captured):
            self.pool_keys[key] -= 1
            if self.pool_keys[key] <= 0:
                del self.pool_keys[key]


__all__ = ["GraphCapture", "refusal", "written_inputs", "WARMUP_RUNS", "CLONED_OUTPUT_BYTES"]
