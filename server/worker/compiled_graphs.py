"""Graph mode, compiled: the daemon turns a shipped graph into inductor kernels (opt-in).

``libremote-server --graph-compiler inductor`` compiles each graph-mode graph (``torch.compile``
on the client, server/graphs.py here) with TorchInductor, PyTorch's own compiler: elementwise
chains fuse into one kernel each (Triton on a GPU, C++ on the CPU backend), so a step launches
fewer kernels and reads memory fewer times than the same ops interpreted one by one.

How a graph gets compiled:

* :func:`to_fx` rebuilds the shipped graph as an ``fx.GraphModule`` of the very ops the
  interpreter would call (the allowlist's :class:`op_policy.OpEntry`), and
  ``torch._inductor.compile_fx.compile_fx`` compiles it for fake copies of the first call's
  inputs. It re-traces the graph with AOT autograd, so inputs the graph writes (batch-norm
  statistics, an optimizer's state) are written back, and outputs that are views of inputs stay
  views of them.
* Compiling takes seconds (minutes for a large model on a GPU), so it runs in a background
  thread, one graph at a time for the whole daemon (a closed session's queued compiles are
  skipped). Until it is done the graph is interpreted: neither the calling session nor any
  other waits for it. The thread shares the interpreter lock with the serving loop, so while a
  compile runs every session's per-op host cost rises (inductor builds kernels in worker
  processes of its own, which do not take the lock).
* Tensor constants sent inline in a node become buffers of the module.
* Compiled code is specialised to its inputs' shapes, strides, dtypes and sharing of storage
  (:func:`signature`). A call whose inputs differ is interpreted (the client traces a new graph
  per new input signature anyway, so this is rare).
* On a GPU the compiled code is what a CUDA-graph capture (server/cuda_graphs.py) records, once
  the compile is done: a graph's capture waits for its compile, a captured step's for all of the
  session's.

Graphs that stay interpreted, with the reason counted in ``libremote.session_stats()``:

* graphs that draw random numbers: inductor draws from its own generator, so dropout masks
  would not be the session's (results would no longer match an eager run from the same seed).
  Seeded ops called so that they draw nothing (attention or dropout with probability 0) compile;
* graphs with ops that return uninitialised memory (``empty``): the interpreter zero-fills those
  results so that no tenant reads another's freed memory; compiled code would hand them out;
* sessions under residency management (``--device-memory``/``--host-spill``): compiled code
  reads its inputs where they lie, and the memory manager must be able to bring each back first;
* calls whose inputs are not all tensors on the session's device;
* graphs whose ops' arguments fail op_policy's per-call checks, or whose checks depend on the
  input tensors (views built from explicit strides): :func:`argument_refusal`;
* graphs whose compile fails (the first line of the error is the reason, and the daemon logs it).

Trust: compiled code checks index bounds with device-side asserts, which on a GPU end the CUDA
context of every session on that device when they fire, where the interpreter's kernels raise an
ordinary error. Turn the compiler on for tenants you trust not to send out-of-range indices
(one team's pool, or one tenant per device).
"""

from __future__ import annotations

import collections
import logging
import operator
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.fx as fx

from libremote_wire.codec import DeviceRef, ValueRef

from . import graphs

if TYPE_CHECKING:
    from .op_policy import OpEntry

log = logging.getLogger("libremote.server")

COMPILERS = ("none", "inductor")
#: Bounds on what one session may have compiled, so that no client holds the daemon's one compile
#: slot for long or fills its memory with code: nodes per compiled graph (a GPT-2-small training
#: step's backward has ~1,500), and compiled graphs per session.
MAX_COMPILED_NODES = 20_000
MAX_COMPILED_GRAPHS = 64

#: One compile at a time for the whole daemon: a compile is CPU-heavy, and serving comes first.
_compile_slot = threading.Semaphore(1)


def refusal(graph: graphs.Graph) -> str | None:
    """Why ``graph`` is never compiled, or None."""
    if len(graph.nodes) > MAX_COMPILED_NODES:
        return f"more than {MAX_COMPILED_NODES} ops"
    for node in graph.nodes:
        entry = node.entry
        if entry is None:
            continue
        if (entry.takes_generator or entry.seeded_without_generator) and _draws_random_numbers(entry, node):
            return f"random op {entry.name} (compiled code would not draw from the session's generator)"
        if entry.zero_fill_result:
            return f"{entry.name} returns uninitialised memory"
    return None


def argument_refusal(graph: graphs.Graph, device: torch.device, device_of: Callable[[DeviceRef], Any]) -> str | None:
    """Why compiled code may not run ``graph``'s ops on their arguments, or None. The interpreter
    checks arguments per call (op_policy's ``check_arguments``); compiled code never calls back
    into it, so the graph's constant arguments are checked here, once, and an op whose check
    depends on its input tensors (a view with explicit strides, checked against its input's
    storage) keeps the graph interpreted."""
    for node in graph.nodes:
        entry = node.entry
        if entry is None or entry.check_arguments is None:
            continue
        if entry.rule == "geometry_checked":
            return f"{entry.name} builds a view from explicit strides (bounds checked per call by the interpreter)"

        def bind(value: Any) -> Any:
            if isinstance(value, list):
                return [bind(item) for item in value]
            return device_of(value) if isinstance(value, DeviceRef) else value

        try:
            entry.check_arguments(bind(node.args), {key: bind(value) for key, value in node.kwargs.items()}, [device])
        except Exception as exc:  # ArgumentRefused, or a device reference the session lacks
            return f"{entry.name}: {exc}"
    return None


def _draws_random_numbers(entry: OpEntry, node: graphs.Node) -> bool:
    """Whether a seeded op (``entry``, ``node``'s) draws random numbers as called here. Attention
    ops are tagged seeded for their dropout; with ``dropout_p=0`` (evaluation, or a model trained
    without dropout) they draw nothing, and so does a dropout with ``p=0`` or ``train=False``."""
    for position, argument in enumerate(entry.overload._schema.arguments):
        if argument.name not in ("dropout_p", "p", "train"):
            continue
        if position < len(node.args):
            value = node.args[position]
        elif argument.name in node.kwargs:
            value = node.kwargs[argument.name]
        elif argument.has_default_value():
            value = argument.default_value
        else:
            continue
        if argument.name == "train" and value is False:
            return False
        if argument.name != "train" and type(value) in (int, float) and value == 0:
            return False
    return True


def to_fx(graph: graphs.Graph, device_of: Callable[[DeviceRef], Any]) -> fx.GraphModule:
    """``graph`` as an fx graph of the same calls the interpreter makes: each node's op, or its
    translation on devices without a kernel for it."""
    fx_graph = fx.Graph()
    root = torch.nn.Module()
    values: list[Any] = [fx_graph.placeholder(f"input_{i}") for i in range(graph.input_count)]

    def bind(value: Any) -> Any:
        if isinstance(value, ValueRef):
            return values[value.index]
        if isinstance(value, list):
            return [bind(item) for item in value]
        if isinstance(value, DeviceRef):
            return device_of(value)
        if isinstance(value, torch.Tensor):  # a constant sent inline: a buffer of the module
            name = f"constant_{len(root._buffers)}"
            root.register_buffer(name, value)
            return fx_graph.get_attr(name)
        return value

    for node in graph.nodes:
        args = [bind(arg) for arg in node.args]
        if node.entry is None:  # getitem
            values.append(fx_graph.call_function(operator.getitem, tuple(args)))
        else:
            kwargs = {key: bind(value) for key, value in node.kwargs.items()}
            if node.entry.sanitize is not None:  # as the interpreter does (e.g. never an unsafe index_put)
                node.entry.sanitize(args, kwargs)
            values.append(fx_graph.call_function(_target(node.entry), tuple(args), kwargs))
    fx_graph.output([bind(output) for output in graph.outputs])
    return fx.GraphModule(root, fx_graph)


def _target(entry: OpEntry) -> Callable[..., Any]:
    """What an fx node calls for ``entry``: its translation if it has one, else the overload
    (``entry.call`` is then the overload's bare C++ callable, which fx cannot name)."""
    return entry.overload if entry.call is entry.overload._op else entry.call


def signature(inputs: list[Any]) -> tuple[Any, ...] | None:
    """What compiled code is specialised to: each input's metadata (lazy conjugate and negation
    bits included) and which inputs share a storage. None when an input is not a tensor."""
    key: list[Any] = []
    first_of_storage: dict[int, int] = {}
    for position, value in enumerate(inputs):
        if not isinstance(value, torch.Tensor):
            return None
        storage = value.untyped_storage()._cdata
        key.append((value.dtype, value.device, value.shape, value.stride(), value.storage_offset(),
                    value.is_conj(), value.is_neg(), first_of_storage.setdefault(storage, position)))
    return tuple(key)


@dataclass
class _Compile:
    """One graph's compile: pending until ``compiled`` or ``failed`` is set by its thread."""

    signature: tuple[Any, ...]
    compiled: Callable[..., Any] | None = None
    failed: str | None = None
    seconds: float = 0.0  # the compile's own time, not its wait for the daemon's compile slot
    #: Set when the session closes: a compile that has not started yet is skipped.
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)


class GraphCompiler:
    """One session's compiled graphs (``--graph-compiler inductor``)."""

    def __init__(self, device: torch.device, device_of: Callable[[DeviceRef], Any]) -> None:
        self.device = device
        self.device_of = device_of
        self._compiles: dict[int, tuple[graphs.Graph, _Compile]] = {}
        self.compiled_runs = 0
        #: Why calls were interpreted instead of running compiled code, with counts.
        self.interpreted: collections.Counter[str] = collections.Counter()

    @property
    def compiles(self) -> int:
        return sum(1 for _, c in self._compiles.values() if c.compiled is not None)

    @property
    def compile_s(self) -> float:
        """Seconds spent compiling this session's graphs (finished compiles, failed ones too)."""
        return sum(c.seconds for _, c in self._compiles.values() if c.done.is_set())

    @property
    def pending(self) -> int:
        return sum(1 for _, c in self._compiles.values() if not c.done.is_set())

    def executor(self, graph_id: int, graph: graphs.Graph, inputs: list[Any],
                 interpret: Callable[[list[Any]], list[Any]]) -> tuple[Callable[[list[Any]], list[Any]], bool]:
        """How to run this call: the compiled code (which interprets inputs unlike those it was
        compiled for), or ``interpret``; and whether that choice is settled (False while a compile
        is pending: a CUDA-graph capture should wait)."""
        known = self._compiles.get(graph_id)
        if known is None or known[0] is not graph:  # new, or redefined under the same id
            reason = (refusal(graph) or graphs.input_refusal(inputs, self.device)
                      or argument_refusal(graph, self.device, self.device_of))
            if reason is None and self.compiles + self.pending >= MAX_COMPILED_GRAPHS:
                reason = f"this session has {MAX_COMPILED_GRAPHS} compiled graphs already"
            started: _Compile | None = None
            if reason is None:
                try:
                    started = self._start(graph, inputs)
                except Exception as exc:  # preparing the compile must never fail the call itself
                    reason = f"compile not started: {type(exc).__name__}: {str(exc).strip()[:200]}"
                    log.warning("a %s stays interpreted: %s", graph.name, reason)
            if started is None:
                started = _Compile((), failed=reason)
                started.done.set()
            known = self._compiles[graph_id] = (graph, started)
        work = known[1]
        if not work.done.is_set():
            self.interpreted["compiling"] += 1
            return interpret, False
        if work.compiled is None:
            self.interpreted[work.failed or "not compiled"] += 1
            return interpret, True
        compiled, compiled_for = work.compiled, work.signature

        def run_compiled(call_inputs: list[Any]) -> list[Any]:
            # Checked here, when the code is about to run, not per call: a call that a CUDA graph
            # replays never gets here, and need not pay for reading every input's metadata.
            if signature(call_inputs) != compiled_for:
                self.interpreted["inputs differ from the compiled call's"] += 1
                return interpret(call_inputs)
            with torch.no_grad():
                outputs = compiled(*call_inputs)
            self.compiled_runs += 1
            return list(outputs)

        return run_compiled, True

    def close(self) -> None:
        """The session is gone: its compiles that wait for the daemon's slot are skipped, so a
        client that defines graphs and leaves does not keep other sessions' compiles waiting."""
        for _, work in self._compiles.values():
            work.cancelled = True
        self._compiles.clear()

    def _start(self, graph: graphs.Graph, inputs: list[torch.Tensor]) -> _Compile:
        """Compile ``graph`` for inputs like ``inputs`` in a background thread."""
        from torch._subclasses.fake_tensor import FakeTensorMode

        key = signature(inputs)
        assert key is not None  # input_refusal: all tensors
        work = _Compile(key)
        # Fake copies made here, on the serving thread: the compile never touches live tensors,
        # which the session goes on using (and freeing) meanwhile. One mode for all of them keeps
        # inputs that share a storage sharing one.
        fake_mode = FakeTensorMode(allow_non_fake_inputs=False)
        fakes = [fake_mode.from_tensor(tensor.detach()) for tensor in inputs]
        module = to_fx(graph, self.device_of)
        name = graph.name
        threading.Thread(target=_compile, args=(work, module, fakes, name), daemon=True,
                         name="libremote-graph-compile").start()
        return work


def _compile(work: _Compile, module: fx.GraphModule, fakes: list[torch.Tensor], name: str) -> None:
    """The compile thread's body: inductor's ``compile_fx``; a failure leaves the graph interpreted."""
    from torch._inductor.compile_fx import compile_fx

    with _compile_slot:
        if work.cancelled:
            work.failed = "not compiled: the session closed first"
            work.done.set()
            log.info("skipped compiling a %s: its session closed", name)
            return
        start = time.perf_counter()
        try:
            with torch.no_grad():
                # On a GraphModule, without AOT or cpp_wrapper options, compile_fx returns the
                # compiled callable; the other members of its declared union are those modes'.
                work.compiled = cast(Callable[..., Any], compile_fx(module, fakes))
        except Exception as exc:
            first_line = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            work.failed = f"compile failed: {type(exc).__name__}: {first_line}"
        finally:
            work.seconds = time.perf_counter() - start
            work.done.set()
    if work.failed:
        log.warning("a %s stays interpreted: %s", name, work.failed)
    else:
        log.info("compiled a %s with inductor in %.1f s", name, work.seconds)


__all__ = ["COMPILERS", "GraphCompiler", "argument_refusal", "refusal", "signature", "to_fx"]
