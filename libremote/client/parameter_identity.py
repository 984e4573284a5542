"""``model.cuda()``, ``model.to("cuda")``, ``model.cpu()`` keep the model's Parameter objects.

Layer 4, the torch-facing facade.

On CUDA, ``Module._apply`` (behind ``to``/``cuda``/``cpu``/``half``/``to_empty``...) converts each
parameter and then, because a CPU and a CUDA tensor have "compatible shallow-copy types"
(``torch._has_compatible_shallow_copy_type``: both dense), rebinds it in place with
``param.data = converted``: the Python object stays. Tied weights stay tied (GPT-2's ``lm_head``
and ``wte`` share one Parameter) and an optimizer built before the move (Hugging Face
accelerate's order, and many scripts') holds the very tensors that train.

A remote tensor is a wrapper subclass (Python dispatch key, ``remote`` backend): not compatible
with a CPU tensor, and ``.data =`` cannot turn a CPU tensor into one. So torch takes its other
branch and puts a new ``Parameter`` in ``module._parameters``: ties come apart, and an optimizer
created earlier steps stale CPU copies while the model never trains, silently.

The fix runs where torch made that choice: :func:`_apply` wraps ``Module._apply`` and, for each
parameter that torch replaced while crossing between the host and the remote device where CUDA
would have kept it, swaps the converted tensor into the original object and puts that object
back (:func:`_become`: what ``torch.utils.swap_tensors`` does, torch's own tool for traceable
wrapper subclasses and ``torch.__future__.set_swap_module_params_on_conversion(True)``). The
swap exchanges the C++ tensor, the Python class and ``__dict__``: the program's object becomes
the ``RemoteTensor`` (still ``isinstance(p, nn.Parameter)``, via ``_is_param``) and owns its
daemon handle (``_ref`` travels in ``__dict__``); the discarded object takes the old host
tensor, which is freed with it (or, for ``.cpu()``, the remote tensor and its handle). The same
is done for ``p.grad``. Attributes the program set on a parameter stay with it.

As on CUDA, ``torch.__future__.set_overwrite_module_params_on_conversion(True)`` gives new
objects, and moves CUDA itself would not do in place (``meta`` -> ``cuda`` in ``to_empty``) give
new objects too. Buffers are replaced by their converted tensors, as torch does on every device.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from . import warning_location
from .tensor import OWN_ATTRIBUTES, RemoteTensor

_original_apply: Callable[..., Any] = torch.nn.Module._apply


def _apply(self: torch.nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
    """``Module._apply``, then the parameter objects put back where CUDA would have kept them.
    Children run through this too (torch's ``_apply`` recurses with ``module._apply``), before
    the module's own parameters: a weight shared with an earlier module has been moved and kept
    there already, so torch finds it on the device and rebinds it in place (``.data =``)."""
    if torch.__future__.get_overwrite_module_params_on_conversion():
        return _original_apply(self, fn, recurse)
    before = {key: (param, param.grad) for key, param in self._parameters.items() if param is not None}
    result = _original_apply(self, fn, recurse)
    for key, (old, old_grad) in before.items():
        new = self._parameters.get(key)
        if new is not None and new is not old and _cuda_keeps_object(old, new):
            _keep_parameter(self, key, old, old_grad, new)
    return result


#: A dense tensor: torch's "compatible shallow-copy type" with it is what a CUDA tensor has too.
_DENSE = torch.empty(0)


def _cuda_keeps_object(old: torch.Tensor, new: torch.Tensor) -> bool:
    """Whether CUDA would have rebound ``old`` in place: torch's own rule
    (``_has_compatible_shallow_copy_type``), with the remote tensor taken as the dense CUDA
    tensor it stands for. So CPU <-> cuda moves keep the object; meta -> cuda does not."""
    if isinstance(old, RemoteTensor):
        return not isinstance(new, RemoteTensor) and torch._has_compatible_shallow_copy_type(new, _DENSE)
    return isinstance(new, RemoteTensor) and torch._has_compatible_shallow_copy_type(old, _DENSE)


def _keep_parameter(module: torch.nn.Module, key: str, old: torch.Tensor, old_grad: torch.Tensor | None,
                    new: torch.Tensor) -> None:
    """Make ``old`` the converted parameter ``new`` and put it back in ``module._parameters``."""
    new_grad = new.grad
    old.grad = None  # the grads are swapped on their own below
    new.grad = None
    try:
        _become(old, new)
    except RuntimeError as exc:
        old.grad, new.grad = old_grad, new_grad
        warning_location.warn(
            f"libremote: {type(module).__name__}.{key} is a new Parameter object after moving the "
            f"module ({exc}); tied weights and optimizers created before the move do not follow it. "
            "Create the optimizer after moving the model."
        )
        return
    module._parameters[key] = old
    if new_grad is not None and old_grad is not None:
        try:
            _become(old_grad, new_grad)
            new_grad = old_grad
        except RuntimeError:
            pass  # p.grad is a new tensor: the parameter itself is what matters
    old.grad = new_grad


def _become(program_object: torch.Tensor, converted: torch.Tensor) -> None:
    """``program_object`` takes ``converted``'s tensor, class and bookkeeping (so it owns the
    daemon handle, if any); ``converted`` takes the old tensor and is dropped by the caller.
    Attributes the program set on its object stay with it.

    ``torch.utils.swap_tensors`` without its use-count check, which refuses a tensor that C++
    still holds elsewhere: an autograd graph recorded before the move (``ref = model(x)`` on the
    CPU, then ``model.cuda()``: common) or a view. CUDA's ``.data =`` does not mind them either:
    those holders keep the old tensor. As torch's swap does, the old tensor's gradient
    accumulator is made to raise, so a backward through such a graph fails loudly instead of
    leaving its gradient on the discarded object. Weak references are refused as torch refuses
    them: code that holds one (weak-keyed caches, compiled code's guards) may have recorded the
    tensor as it was.
    """
    for tensor in (program_object, converted):
        if weakref.getweakrefs(tensor):
            raise RuntimeError("a weak reference to the tensor is held")
    if program_object._use_count() > 1 and program_object.requires_grad and program_object.is_leaf:
        accumulator = torch.autograd.graph.get_gradient_edge(program_object).node
        accumulator.register_prehook(_moved_before_backward)
    own = {name: value for name, value in program_object.__dict__.items()
           if name not in OWN_ATTRIBUTES and name != "_is_param"}
    program_object.__class__, converted.__class__ = converted.__class__, program_object.__class__
    program_object.__dict__, converted.__dict__ = converted.__dict__, program_object.__dict__
    torch._C._swap_tensor_impl(program_object, converted)
    for name, value in own.items():
        program_object.__dict__.setdefault(name, value)


def _moved_before_backward(grad_outputs: Any) -> None:
    raise RuntimeError(
        "libremote: backward through a graph recorded before its parameters moved (model.cuda() or "
        ".cpu() between forward and backward); move the model before the forward pass"
    )
