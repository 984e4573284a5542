"""Graph mode on the client: aten graphs shipped to the daemon once, then run by handle.

Layer 3, the op path: a graph's ops go as one command.

:mod:`.compile` traces a model with AOT autograd into a forward and a backward aten graph (on
``meta`` stand-ins, so tracing sends nothing). Each graph becomes a :class:`RemoteGraph`: its nodes
are encoded once (op names, constants, references to earlier values) and sent as a GRAPH command
the first time it runs in a session; after that a call is one RUN_GRAPH command carrying input
handles and fresh output handles. Output metadata comes from the traced graph itself, so a call
returns at once, like a streamed op.
"""

from __future__ import annotations

import itertools
import operator
import weakref
from typing import Any

import torch
import torch.fx

from libremote_wire import codec, messages, torch_codec
from libremote_wire.messages import Cmd

from . import runtime
from .ops import op_info
from .tensor import RemoteTensor, make

_graph_ids = itertools.count(1)


class GraphUnsupported(Exception):
    """The traced graph holds something the daemon cannot run as a graph (the caller runs eagerly)."""


def _spec(value: Any) -> tuple:
    return (value.dtype, tuple(value.shape), tuple(value.stride()), value.storage_offset())


class RemoteGraph:
    """One traced aten graph, runnable on RemoteTensors (and on meta tensors, for tracing)."""

    _boxed_call = True  # AOT autograd calls compiled graphs with one list of arguments

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.id = next(_graph_ids)
        self.input_count, self.nodes, self.outputs, self.output_specs = _encode(gm)
        self.op_count = sum(1 for node in self.nodes if node[0] != "getitem")
        self._defined_in: Any = weakref.WeakSet()  # the sessions whose daemons know this graph

    def __call__(self, args: list[Any]) -> list[Any]:
        inputs = list(args)
        args.clear()  # boxed convention: the caller's list must not keep inputs alive
        if any(isinstance(value, torch.Tensor) and value.device.type == "meta" for value in inputs):
            return [None if spec is None else _meta(spec) for spec in self.output_specs]
        # The daemon of the inputs' device (with several daemons, libremote/client/servers.py).
        index = next((v._device_index for v in inputs if isinstance(v, RemoteTensor)), None)
        session = runtime.current() if index is None else runtime.session_for(index)
        if index is None:
            index = session.global_devices[0]  # (0 with one daemon)
        if session not in self._defined_in:
            session.submit([Cmd.GRAPH, self.id, self.input_count, self.nodes, self.outputs])
            self._defined_in.add(session)
        wire_inputs = [_wire_input(value, session) for value in inputs]
        results = [None if spec is None else make(spec, session, index) for spec in self.output_specs]
        outs = [None if tensor is None else tensor._ref.id for tensor in results]
        if session.op_log is not None:
            session.op_log.append(f"libremote::graph({self.op_count} ops)")
        session.submit([Cmd.RUN_GRAPH, self.id, wire_inputs, outs])
        return results


def _meta(spec: tuple) -> torch.Tensor:
    dtype, shape, stride, offset = spec
    return torch.empty_strided(shape, stride, dtype=dtype, device="meta")


def _wire_input(value: Any, session: Any) -> Any:
    if isinstance(value, RemoteTensor):
        if value._ref.session is not session:
            raise RuntimeError("libremote: a compiled graph got a tensor of an earlier session; recreate it")
        return value._ref.wire
    if value is None or isinstance(value, (bool, int, float)):
        return value
    raise GraphUnsupported(f"graph input of type {type(value).__name__}")


def _encode(gm: torch.fx.GraphModule) -> tuple[int, list[Any], list[Any], list[Any]]:
    """The wire form of ``gm``: (input count, nodes, outputs, output tensor specs)."""
    slots: dict[torch.fx.Node, int] = {}
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    for index, node in enumerate(placeholders):
        slots[node] = index
    nodes: list[Any] = []

    def value(item: Any) -> Any:
        if isinstance(item, torch.fx.Node):
            return codec.value_ext(slots[item])
        if item is None or isinstance(item, (bool, int, float, str)):
            return item
        if isinstance(item, (list, tuple)):
            return [value(element) for element in item]
        if isinstance(item, torch.dtype):
            return torch_codec.dtype_ext(item)
        if isinstance(item, torch.device):
            return codec.device_ext(0)  # traced on meta: the graph's device is the caller's
        if isinstance(item, torch.memory_format):
            return torch_codec.memory_format_ext(item)
        if isinstance(item, torch.layout):
            return torch_codec.layout_ext(item)
        if isinstance(item, complex):
            return codec.complex_ext(item)
        raise GraphUnsupported(f"constant of type {type(item).__name__}")

    output_node = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            output_node = node
            break
        if node.op == "get_attr":
            constant = getattr(gm, node.target)
            if not isinstance(constant, torch.Tensor) or constant.nbytes > messages.INLINE_TENSOR_BYTES:
                raise GraphUnsupported(f"graph constant {node.target}")
            nodes.append(["aten::_to_copy", [torch_codec.inline_tensor_ext(constant.cpu())],
                          {"device": codec.device_ext(0)}])
        elif node.op == "call_function" and node.target is operator.getitem:
            nodes.append(["getitem", [value(node.args[0]), node.args[1]], {}])
        elif node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            nodes.append([op_info(node.target).name, [value(a) for a in node.args],
                          {key: value(v) for key, v in node.kwargs.items()}])
        else:
            raise GraphUnsupported(f"graph node {node.format_node()}")
        slots[node] = len(placeholders) + len(nodes) - 1
    assert output_node is not None
    outputs, specs = [], []
    for item in output_node.args[0]:
        if isinstance(item, torch.fx.Node):
            example = item.meta.get("val")
            if not isinstance(example, torch.Tensor):
                raise GraphUnsupported(f"graph output {item.name} is not a tensor")
            outputs.append(codec.value_ext(slots[item]))
            specs.append(_spec(example))
        elif item is None:
            outputs.append(None)
            specs.append(None)
        else:
            raise GraphUnsupported(f"graph output {item!r}")
    return len(placeholders), nodes, outputs, specs
