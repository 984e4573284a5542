"""``torch.compile`` under libremote: graph mode.

Layer 4, the torch-facing facade, over graph mode's op path (:mod:`.graphs`).

``torch.compile(model)`` (any backend, or ``backend="libremote"``) returns a wrapper that, per
distinct input signature, traces the model with AOT autograd into a forward and a backward aten
graph and ships each to the daemon once (:mod:`.graphs`). A call then sends one command for the
forward and, in ``backward()``, one for the backward, instead of one per aten op.

Why not TorchDynamo: Dynamo would need remote tensors to be traceable tensor subclasses, and its
fake tensors would take the ``cuda`` device the tensors report, which a CPU-only torch cannot
hold. AOT autograd alone (``functorch.compile.aot_function``) traces through
``__torch_dispatch__``; we give it ``meta`` stand-ins of the parameters and inputs, so tracing
runs locally and sends nothing.

What that means for users, unlike Dynamo: the model is traced like ``torch.jit.trace``/``make_fx``.
Python control flow is specialised to the traced call; a recompile happens when tensor shapes,
dtypes, ``requires_grad``, ``module.training`` or grad mode change (the cache key), not when other
Python state does. Code that reads tensor values (``.item()``, data-dependent branches) or ops the
graph cannot hold make the trace fail: that signature then runs eagerly, with a one-time warning.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

from . import attention, meta, warning_location
from .graphs import RemoteGraph
from .tensor import RemoteTensor

_original_compile = torch.compile


class _Eager:
    """Marks a signature whose trace failed: it runs op by op."""


def _signature(leaves: list[Any]) -> tuple:
    key = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            key.append(("T", leaf.dtype, tuple(leaf.shape), tuple(leaf.stride()), leaf.requires_grad))
        else:
            key.append(("V", type(leaf).__name__, repr(leaf)[:200]))
    return tuple(key)


def _stand_in(value: Any) -> Any:
    """A meta tensor with a remote tensor's metadata and ``requires_grad``, to trace on."""
    if not isinstance(value, RemoteTensor):
        return value
    return meta.stand_in(value).requires_grad_(value.requires_grad)


class GraphFunction:
    """A function (or a module's forward, with its parameters and buffers as leading inputs)
    compiled per input signature into remote graphs."""

    def __init__(self, fn: Callable[..., Any], module: torch.nn.Module | None = None) -> None:
        self.fn = fn
        self.module = module
        self.cache: dict[tuple, Any] = {}
        self.compiles = 0  # traces done (one per new signature); tests and users can watch it

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        state_names, state = self._state()
        leaves, spec = pytree.tree_flatten((args, kwargs))
        flat = [*state, *leaves]
        tensors = [value for value in flat if isinstance(value, torch.Tensor)]
        if not tensors or not all(isinstance(value, RemoteTensor) for value in tensors):
            return self.fn(*args, **kwargs)  # host tensors take part: eager, with torch's own rules
        grad = torch.is_grad_enabled()
        key = (spec, _signature(flat), grad, self.module.training if self.module is not None else None)
        compiled = self.cache.get(key)
        if compiled is None:
            compiled = self.cache[key] = self._trace(state_names, spec, flat, grad)
        if compiled is _Eager:
            return self.fn(*args, **kwargs)
        outputs = compiled(*flat)
        for output in pytree.tree_leaves(outputs):
            if isinstance(output, RemoteTensor) and output.requires_grad:
                output.register_hook(functools.partial(_as_traced, stride=output.stride()))
        return outputs

    def _state(self) -> tuple[list[str], list[torch.Tensor]]:
        if self.module is None:
            return [], []
        named = [*self.module.named_parameters(remove_duplicate=False), *self.module.named_buffers(remove_duplicate=False)]
        return [name for name, _ in named], [tensor for _, tensor in named]

    def _trace(self, state_names: list[str], spec: Any, flat: list[Any], grad: bool) -> Any:
        from functorch.compile import aot_function

        count = len(state_names)
        fn, module = self.fn, self.module

        def flat_fn(*values: Any) -> Any:
            args, kwargs = pytree.tree_unflatten(list(values[count:]), spec)
            if module is None:
                return fn(*args, **kwargs)
            return torch.func.functional_call(module, dict(zip(state_names, values[:count])), args, kwargs,
                                              strict=False, tie_weights=False)

        compiled = aot_function(flat_fn, fw_compiler=_ship, bw_compiler=_ship)
        attention.tracing_graph = True
        try:
            with torch.set_grad_enabled(grad):
                compiled(*[_stand_in(value) for value in flat])  # trace now, on meta: nothing is sent
        except Exception as exc:  # noqa: BLE001 - any trace failure means "run eagerly"
            _warn_eager(exc)
            return _Eager
        finally:
            attention.tracing_graph = False
        self.compiles += 1
        return compiled


def _ship(gm: torch.fx.GraphModule, example_inputs: Any) -> RemoteGraph:
    """AOT autograd's compiler hook: the traced graph becomes a graph the daemon runs."""
    return RemoteGraph(gm)


def _as_traced(grad: torch.Tensor, stride: tuple[int, ...]) -> torch.Tensor:
    """A gradient arriving at a compiled output, laid out as the traced backward expects.

    AOT autograd would re-stride it itself (``coerce_to_expected_memory_format``) with
    ``torch.empty_strided(device=grad.device)``, but a remote tensor reports ``cuda`` and that
    code runs inside ``backward()``, outside libremote's device mapping. ``x.sum().backward()``
    is the common case: its gradient is an expanded tensor with zero strides."""
    if grad.stride() == stride or not isinstance(grad, RemoteTensor):
        return grad
    return grad.new_empty_strided(grad.shape, stride).copy_(grad)


class CompiledModule(torch.nn.Module):
    """What ``torch.compile(module)`` returns under libremote: the module, run through graphs.
    Parameters, buffers and ``state_dict`` are the original module's (as ``_orig_mod``, like
    torch's ``OptimizedModule``)."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self._orig_mod = module
        self._graph_function = GraphFunction(module.forward, module)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._graph_function(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._orig_mod, name)

    @property
    def compiles(self) -> int:
        return self._graph_function.compiles


def _warn_eager(exc: Exception) -> None:
    warning_location.warn(
        f"libremote: torch.compile could not trace this call into a graph ({type(exc).__name__}: "
        f"{str(exc)[:300]}); this input signature runs eagerly, op by op, with the same results.",
        UserWarning,
    )


def compile_for_remote(model: Any) -> Any:
    if isinstance(model, torch.nn.Module):
        return CompiledModule(model)
    graph_function = GraphFunction(model)
    return functools.wraps(model)(lambda *args, **kwargs: graph_function(*args, **kwargs))


@functools.wraps(_original_compile)
def compile(model: Any = None, *args: Any, disable: bool = False, **kwargs: Any) -> Any:  # noqa: A001
    if disable:
        return model if model is not None else (lambda target: target)
    if model is None:  # @torch.compile(...) with arguments
        return compile_for_remote
    return compile_for_remote(model)
