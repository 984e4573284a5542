"""Graph mode on the daemon: aten graphs a client defined once, run on its handles many times.

A client that compiles a model (``torch.compile`` under libremote) sends each forward and
backward aten graph once (GRAPH) and then only the handles of its inputs per call (RUN_GRAPH).
A graph is a list of nodes; node *i* computes value ``inputs + i`` from earlier values
(``ValueRef``), constants and devices (``DeviceRef``). Every node's op is resolved against the
same allowlist as single ops when the graph is defined, so a refused op fails the definition,
not a run. The interpreter drops each value after its last use, so a run's peak memory is what
the graph needs at once, not the sum of its intermediates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from libremote_wire import codec
from libremote_wire.codec import DeviceRef, ProtocolError, ValueRef

from . import op_policy

#: Bounds on what one client may define: nodes per graph and graphs per session.
MAX_GRAPH_NODES = 100_000
MAX_GRAPHS_PER_SESSION = 512

GETITEM = "getitem"  # the one node that is not an aten op: element of a node's tuple result


@dataclass
class Node:
    entry: op_policy.OpEntry | None  # None: GETITEM
    args: list[Any]
    kwargs: dict[str, Any]
    drop_after: tuple[int, ...]  # values no later node or output needs


@dataclass
class Graph:
    input_count: int
    nodes: list[Node]
    outputs: list[Any]  # ValueRef or a constant (None)

    @property
    def name(self) -> str:
        return f"graph of {len(self.nodes)} ops"


def define(input_count: Any, wire_nodes: Any, wire_outputs: Any) -> Graph:
    """Check and build a graph from its wire form; :class:`ProtocolError` or
    :class:`op_policy.OpRefused` when it is malformed or uses a refused op."""
    codec.check(isinstance(input_count, int) and 0 <= input_count <= MAX_GRAPH_NODES, "bad graph input count")
    codec.check(isinstance(wire_nodes, list) and len(wire_nodes) <= MAX_GRAPH_NODES,
                   lambda: f"a graph has at most {MAX_GRAPH_NODES} nodes")
    codec.check(isinstance(wire_outputs, list), "graph outputs must be a list")
    last_use: dict[int, int] = {}
    nodes: list[Node] = []
    for position, wire in enumerate(wire_nodes):
        codec.check(isinstance(wire, list) and len(wire) == 3 and isinstance(wire[0], str)
                       and isinstance(wire[1], list) and isinstance(wire[2], dict),
                       lambda: f"graph node {position} must be [op name, args, kwargs]")
        name, args, kwargs = wire
        available = input_count + position

        def note(ref: ValueRef) -> None:
            codec.check(0 <= ref.index < available,
                           lambda: f"graph node {position} uses value {ref.index} before it exists")
            last_use[ref.index] = position

        visit(args, note)
        visit(kwargs, note)
        if name == GETITEM:
            codec.check(len(args) == 2 and isinstance(args[0], ValueRef) and isinstance(args[1], int),
                           lambda: f"graph node {position}: getitem takes [value, index]")
            entry = None
        else:
            entry = op_policy.resolve(name)
        nodes.append(Node(entry, args, kwargs, ()))
    end = len(nodes)
    for output in wire_outputs:
        if isinstance(output, ValueRef):
            codec.check(0 <= output.index < input_count + end, "graph output names a missing value")
            last_use[output.index] = end  # kept to the end
    drops: dict[int, list[int]] = {}
    for value, position in last_use.items():
        if position < end and value >= input_count:  # inputs belong to the caller
            drops.setdefault(position, []).append(value)
    for position, node in enumerate(nodes):
        node.drop_after = tuple(drops.get(position, ()))
    return Graph(input_count, nodes, wire_outputs)


def run(graph: Graph, inputs: list[Any], call: Callable[[op_policy.OpEntry, list[Any], dict[str, Any]], Any],
        device_of: Callable[[DeviceRef], Any]) -> list[Any]:
    """Interpret ``graph`` on ``inputs``; ``call`` runs one op (the session's, with its generator,
    residency and out-of-memory handling). Returns the output values."""
    values: list[Any] = list(inputs) + [None] * len(graph.nodes)
    slot = graph.input_count
    for node in graph.nodes:
        args = [_bind(arg, values, device_of) for arg in node.args]
        if node.entry is None:
            values[slot] = args[0][args[1]]
        else:
            values[slot] = call(node.entry, args, {key: _bind(value, values, device_of)
                                                   for key, value in node.kwargs.items()})
        for index in node.drop_after:
            values[index] = None
        slot += 1
    return [_bind(output, values, device_of) for output in graph.outputs]


def input_refusal(inputs: list[Any], device: Any) -> str | None:
    """Why compiled or captured code cannot take ``inputs`` (it runs on tensors of ``device``
    only), or None."""
    for value in inputs:
        if not isinstance(value, torch.Tensor):
            return "an input is not a tensor"
        if value.device != device:
            return f"an input is on {value.device}, not {device}"
    return None


def _bind(value: Any, values: list[Any], device_of: Callable[[DeviceRef], Any]) -> Any:
    """``value`` with references to graph values and devices resolved. (A module function, not a
    closure: a recursive closure is a reference cycle that would keep ``values``, and every
    tensor in it, alive until the garbage collector runs.)"""
    if isinstance(value, ValueRef):
        return values[value.index]
    if isinstance(value, list):
        return [_bind(item, values, device_of) for item in value]
    if isinstance(value, DeviceRef):
        return device_of(value)
    return value


def visit(value: Any, note: Callable[[ValueRef], None], depth: int = 0) -> None:
    """Call ``note`` on every value reference inside ``value`` (lists and maps included).
    :class:`ProtocolError` for nesting deeper than codec.MAX_NESTING (so that :func:`_bind`,
    which walks the same values on every run, never meets it)."""
    if isinstance(value, ValueRef):
        note(value)
    elif isinstance(value, (list, dict)):
        codec.check(depth < codec.MAX_NESTING, lambda: f"a graph argument is nested more than {codec.MAX_NESTING} deep")
        for item in (value if isinstance(value, list) else value.values()):
            visit(item, note, depth + 1)


__all__ = ["Graph", "define", "input_refusal", "run", "GETITEM", "MAX_GRAPH_NODES", "MAX_GRAPHS_PER_SESSION", "ProtocolError"]
