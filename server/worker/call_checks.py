"""Per-call checks of kernels that trust their arguments, found by probing and by fuzzing.

Each kernel below reads or writes memory sized by one argument while indexing it with another,
and checks neither against the other. The daemon's process boundary keeps what such a kernel
reaches inside its tenant's own worker (SECURITY.md); these checks stop the kernel from running
at all, so that a hostile tenant gets an error instead of its worker's heap. They were found by
raw clients against the daemon (issue 19) and by ``scripts/fuzz_ops.py``, which pairs every
allowed overload with hostile tensors (tests/hostile_ops.py); "Crashes it finds also become op
rules", and these are they. ``op_rules.argument_checker`` adds an op's check here
(:func:`check_for`) to whatever rule allowed the op, and runs it before every call.

A check takes the call's arguments by schema name (None where the client left one out: its
default) and returns why the call is refused, or None. Checks read only shapes, dtypes, strides
and, for index-like tensors, their values (one min/max reduction: on a GPU, one sync per call of
these few ops). A check that cannot make sense of its arguments refuses the call
(:func:`run_check`): the kernel would have been handed the same nonsense.

The tests are tests/test_findings.py (each finding, with its repro from a hostile tenant).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, TypeGuard

import torch

#: A check: the call's arguments by name -> why the call is refused, or None.
CallCheck = Callable[[Mapping[str, Any]], "str | None"]

INDEX_DTYPES = (torch.int32, torch.int64)


def _is_tensor(value: Any) -> TypeGuard[torch.Tensor]:
    return isinstance(value, torch.Tensor)


#: ``torch.broadcast_shapes``, seen with its types (torch leaves the function unannotated).
_broadcast_shapes: Callable[..., torch.Size] = torch.broadcast_shapes


def _dense(tensor: torch.Tensor) -> bool:
    """Non-overlapping and dense: its elements fill ``numel`` consecutive slots from its data
    pointer, in some order of dims (what kernels that walk a raw pointer over ``numel`` elements
    assume: an expanded tensor has ``numel`` elements in a storage of one)."""
    expected = 1
    for stride, size in sorted((s, n) for n, s in zip(tensor.shape, tensor.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_layout(tensor: torch.Tensor, like: torch.Tensor) -> bool:
    """Same shape and the same strides over every dim of more than one element (strides of
    size-1 dims place nothing)."""
    return tensor.shape == like.shape and all(
        n == 1 or s == t for n, s, t in zip(tensor.shape, tensor.stride(), like.stride()))


def _values(name: str, tensor: torch.Tensor, low: int, high: int, what: str) -> str | None:
    """Why ``tensor`` holds a value outside ``[low, high]`` (inclusive), or None."""
    if tensor.numel() == 0:
        return None
    smallest, largest = (int(v) for v in torch.aminmax(tensor.reshape(-1)))
    if smallest < low or largest > high:
        return f"argument {name!r} holds values in [{smallest}, {largest}]; they must lie in [{low}, {high}] ({what})"
    return None


def _shape(tensor: Any) -> Any:
    return list(tensor.shape) if _is_tensor(tensor) else type(tensor).__name__


# ------------------------------------------------------------------------------------------------
# _cdist_backward
# ------------------------------------------------------------------------------------------------
def cdist_backward(a: Mapping[str, Any]) -> str | None:
    """``_cdist_backward(grad, x1, x2, p, cdist)`` (aten/src/ATen/native/Distance.cpp) reads
    ``grad`` and ``cdist`` as ``[batch, r1, r2]`` arrays (r1, r2: x1's and x2's rows) without
    checking their shapes: a 1-element ``grad`` against ``x1`` of 2**20 rows read 4 MiB past it,
    and bob FETCHed another tenant's freed secret and heap pointers (issue 19)."""
    grad, x1, x2, cdist = a["grad"], a["x1"], a["x2"], a["cdist"]
    if not all(_is_tensor(t) for t in (grad, x1, x2, cdist)):
        return None  # (the kernel refuses what is not a tensor)
    if x1.dim() < 2 or x2.dim() < 2:
        return f"x1 and x2 must have at least 2 dims, not {list(x1.shape)} and {list(x2.shape)}"
    try:
        batch = list(_broadcast_shapes(x1.shape[:-2], x2.shape[:-2]))
    except RuntimeError:
        return f"the batch dims of x1 {list(x1.shape)} and x2 {list(x2.shape)} do not broadcast"
    expected = [*batch, x1.shape[-2], x2.shape[-2]]
    for name, tensor in (("grad", grad), ("cdist", cdist)):
        if list(tensor.shape) != expected or tensor.dtype != x1.dtype:
            return (f"argument {name!r} is {tensor.dtype} {list(tensor.shape)}; it must be {x1.dtype} {expected} "
                    "(x1's rows by x2's rows)")
    return None


# ------------------------------------------------------------------------------------------------
# Fused optimizers
# ------------------------------------------------------------------------------------------------
#: Per-step tensors of fused optimizers: one element each (the step count, the learning rate,
#: AMP's scale and inf flag), read by the kernels at element 0.
_ONE_ELEMENT = ("state_steps", "lr", "grad_scale", "found_inf")


def fused_optimizer(a: Mapping[str, Any]) -> str | None:
    """``_fused_sgd_``, ``_fused_adam_``, ``_fused_adamw_``, ``_fused_adagrad_`` (and their
    functional and ``out`` forms): the CPU kernels (aten/src/ATen/native/cpu/Fused*Kernel.cpp)
    walk each parameter's ``numel`` elements with raw pointers into its gradient and state
    tensors (momentum buffer, exp_avg, state_sums...) and check neither their sizes nor their
    layouts: a momentum buffer of 1 element for 65,536 parameters was written 256 KiB past its
    end (issue 19). Each per-parameter tensor must have its parameter's shape, dtype and strides,
    and be dense; each step count and scale one element."""
    params = a.get("self")
    if not isinstance(params, (list, tuple)):
        return None
    count = len(params)
    for index, param in enumerate(params):
        if _is_tensor(param) and not _dense(param):
            return f"parameter {index} must be dense (the kernel walks it as {param.numel()} consecutive elements)"
    for name, value in a.items():
        if name == "self" or not isinstance(value, (list, tuple)):
            if name in _ONE_ELEMENT and _is_tensor(value) and value.numel() != 1:
                return f"argument {name!r} must hold one element, not {list(value.shape)}"
            continue
        if value and len(value) != count:
            return f"argument {name!r} holds {len(value)} tensors; there are {count} parameters"
        for index, tensor in enumerate(value):
            if not _is_tensor(tensor):
                continue
            if name in _ONE_ELEMENT:
                if tensor.numel() != 1:
                    return f"argument {name!r}[{index}] must hold one element, not {list(tensor.shape)}"
                continue
            param = params[index]
            if _is_tensor(param) and (not _same_layout(tensor, param) or tensor.dtype != param.dtype
                                      or tensor.device != param.device):
                return (f"argument {name!r}[{index}] is {tensor.dtype} {list(tensor.shape)} with strides "
                        f"{list(tensor.stride())}; it must match parameter {index}: {param.dtype} "
                        f"{list(param.shape)}, strides {list(param.stride())}")
    return None


# ------------------------------------------------------------------------------------------------
# segment_reduce
# ------------------------------------------------------------------------------------------------
def segment_reduce(a: Mapping[str, Any]) -> str | None:
    """``segment_reduce(data, reduce, lengths=, offsets=, axis=)`` (SegmentReduce.cpp): the CPU
    kernel reads ``data`` from each segment's start to its end as the offsets (or the running sum
    of lengths) say, and reads the lengths/offsets themselves at one row per outer index of
    ``data``. Lengths are checked when ``unsafe`` is off (the daemon forces it off); offsets are
    not at all ("TODO: add checks when !unsafe"): offsets ``[0, 2**30]`` read 4 GiB past a
    4-element tensor (issue 19). Offsets must rise from 0 to at most ``data.size(axis)``, lengths
    be non-negative and sum to it, one row per outer index of ``data``."""
    data = a["data"]
    if not _is_tensor(data):
        return None
    if data.dim() == 0:
        return "argument 'data' must have at least one dim"
    axis = a.get("axis") or 0
    if type(axis) is not int or not -data.dim() <= axis < data.dim():
        return f"axis {axis!r:.20} is not a dim of data {list(data.shape)}"
    axis %= data.dim()
    extent = data.shape[axis]
    for name in ("lengths", "offsets"):
        tensor = a.get(name)
        if tensor is None:
            continue
        if not _is_tensor(tensor) or tensor.dtype not in INDEX_DTYPES:
            return f"argument {name!r} must be an int32 or int64 tensor"
        if tensor.dim() != axis + 1 or list(tensor.shape[:-1]) != list(data.shape[:axis]):
            return (f"argument {name!r} has shape {list(tensor.shape)}; it must have data's dims before axis "
                    f"{list(data.shape[:axis])} and one more")
        if name == "offsets":
            if tensor.shape[-1] == 0:
                return "argument 'offsets' must hold at least one offset per row"
            reason = _values(name, tensor, 0, extent, f"data has {extent} elements along axis {axis}")
            if reason is None and tensor.shape[-1] > 1 and bool((tensor.diff(dim=-1) < 0).any()):
                reason = "argument 'offsets' must never decrease along its last dim"
        else:
            reason = _values(name, tensor, 0, extent, f"data has {extent} elements along axis {axis}")
            if reason is None and tensor.numel() and bool((tensor.sum(-1) != extent).any()):
                reason = f"argument 'lengths' must sum to data's {extent} elements along axis {axis} in every row"
        if reason is not None:
            return reason
    return None


# ------------------------------------------------------------------------------------------------
# Weight norm
# ------------------------------------------------------------------------------------------------
def _weight_norm_rows(v: torch.Tensor, dim: Any) -> int | str:
    """How many norms a fused weight norm over ``v`` along ``dim`` makes (one per slice along the
    first or the last dim), or why ``dim`` is not one the fused kernels take."""
    if type(dim) is not int or v.dim() == 0 or dim not in (0, v.dim() - 1):
        return f"dim {dim!r:.20} must be 0 or the last dim of {list(v.shape)} (the fused kernels take no other)"
    if v.shape[dim] == 0:  # (the kernels divide the element count by it: SIGFPE, found by fuzzing)
        return f"v {list(v.shape)} has no elements along dim {dim}"
    return v.shape[dim]


def weight_norm_interface(a: Mapping[str, Any]) -> str | None:
    """``_weight_norm_interface(v, g, dim)`` (WeightNorm.cpp, cpu/WeightNormKernel.cpp): the CPU
    kernel reads ``v`` as a contiguous [M, N] array and ``g`` at one element per norm, and writes
    the norms into a tensor made with ``g``'s sizes and strides, none of it checked: a 1-element
    ``g`` for 65,536 norms wrote 256 KiB past it (found with the weight-norm backward below)."""
    v, g = a["v"], a["g"]
    if not (_is_tensor(v) and _is_tensor(g)):
        return None
    rows = _weight_norm_rows(v, 0 if a.get("dim") is None else a["dim"])
    if isinstance(rows, str):
        return rows
    if not v.is_contiguous() or not g.is_contiguous():
        return "arguments 'v' and 'g' must be contiguous (the kernel reads them as flat arrays)"
    if v.numel() and g.numel() != rows:
        return f"argument 'g' holds {g.numel()} elements; v {list(v.shape)} has {rows} norms along dim {a.get('dim') or 0}"
    return None


def weight_norm_interface_backward(a: Mapping[str, Any]) -> str | None:
    """``_weight_norm_interface_backward(grad_w, saved_v, saved_g, saved_norms, dim)``: the CPU
    kernel sizes everything by ``saved_v``, reads ``grad_w`` as a flat array of as many elements
    (it checks the saved tensors' contiguity, not ``grad_w``'s) and ``saved_g``/``saved_norms`` at
    one element per norm, and writes ``grad_g`` (made like ``saved_g``) at one per norm: a
    1-element ``saved_g`` for 1,024 norms corrupted the heap (issue 19)."""
    grad_w, v, g, norms = a["grad_w"], a["saved_v"], a["saved_g"], a["saved_norms"]
    if not all(_is_tensor(t) for t in (grad_w, v, g, norms)):
        return None
    rows = _weight_norm_rows(v, a["dim"])
    if isinstance(rows, str):
        return rows
    if grad_w.shape != v.shape or grad_w.dtype != v.dtype or not grad_w.is_contiguous():
        return f"argument 'grad_w' is {grad_w.dtype} {list(grad_w.shape)}; it must be contiguous {v.dtype} {list(v.shape)} like saved_v"
    if v.numel():
        for name, tensor in (("saved_g", g), ("saved_norms", norms)):
            if tensor.numel() != rows:
                return f"argument {name!r} holds {tensor.numel()} elements; saved_v {list(v.shape)} has {rows} norms"
    return None


# ------------------------------------------------------------------------------------------------
# repeat_interleave
# ------------------------------------------------------------------------------------------------
def repeat_interleave(a: Mapping[str, Any]) -> str | None:
    """``repeat_interleave`` (Repeat.cpp, Repeat.h): given ``output_size``, the kernel allocates
    that many elements and writes, for each ``i``, ``repeats[i]`` of them ending at the running
    sum of ``repeats``, checking neither the sum against ``output_size`` nor (before it writes)
    the sign: repeats ``[-5, 10]`` with ``output_size=5`` wrote 20 bytes before the result and
    corrupted malloc's bookkeeping (issue 19). Repeats must be non-negative, and ``output_size``
    what they add up to."""
    repeats, output_size, self = a["repeats"], a.get("output_size"), a.get("self")
    if _is_tensor(repeats):
        if repeats.dtype not in INDEX_DTYPES:
            return None  # (the kernel accepts int32 and int64 only)
        smallest = int(repeats.min()) if repeats.numel() else 0
        each = int(repeats.reshape(-1)[0]) if repeats.numel() == 1 and self is not None else None
        total = None if each is not None else int(repeats.sum())
    elif type(repeats) is int:
        smallest = each = repeats
        total = None
    else:
        return None
    if smallest < 0:
        return f"argument 'repeats' holds {smallest}; repeats must not be negative"
    if output_size is None:
        return None
    if each is not None:  # (exactly when total is None) one repeat per element along dim, or of the flattened input
        if not _is_tensor(self):
            return None
        dim = a.get("dim")
        if dim is not None and (type(dim) is not int or not -max(self.dim(), 1) <= dim < max(self.dim(), 1)):
            return f"dim {dim!r:.20} is not a dim of self {list(self.shape)}"
        length = self.numel() if dim is None or self.dim() == 0 else self.shape[dim]
        total = each * length
    if output_size != total:
        return f"output_size {output_size!r:.30} must be the sum of the repeats ({total})"
    return None


# ------------------------------------------------------------------------------------------------
# Out tensors a kernel writes in the input's dtype
# ------------------------------------------------------------------------------------------------
def out_like_self(a: Mapping[str, Any]) -> str | None:
    """``_logcumsumexp.out(self, dim, out=)`` (cpu/LogcumsumexpKernel.cpp): the kernel resizes
    ``out`` to ``self``'s shape, keeping ``out``'s dtype, and writes ``self``'s dtype into it: an
    int8 ``out`` of 32 bytes took 128 bytes of floats (found by scripts/fuzz_ops.py; the public
    ``logcumsumexp.out`` checks the dtype first). ``out`` must have ``self``'s dtype."""
    self, out = a["self"], a.get("out")
    if _is_tensor(self) and _is_tensor(out) and out.dtype != self.dtype:
        return f"argument 'out' is {out.dtype}; it must have self's dtype {self.dtype} (the kernel writes that)"
    return None


# ------------------------------------------------------------------------------------------------
# CTC loss backward
# ------------------------------------------------------------------------------------------------
def _lengths(value: Any) -> list[int] | None:
    if _is_tensor(value):
        return [int(v) for v in value.reshape(-1).tolist()] if not value.is_floating_point() else None
    if isinstance(value, (list, tuple)) and all(type(v) is int for v in value):
        return list(value)
    return None


def ctc_loss_backward(a: Mapping[str, Any]) -> str | None:
    """``_ctc_loss_backward(grad, log_probs, targets, input_lengths, target_lengths,
    neg_log_likelihood, log_alpha, blank)`` (LossCTC.cpp: "We don't do much checking and assume
    that the forward did"): the CPU kernel indexes ``grad`` and ``neg_log_likelihood`` per batch
    item, ``log_alpha`` (and a ``log_beta`` made like it) at every time step below each input
    length and every target position, ``log_probs`` at each target, all unchecked. They must be
    what a forward over ``log_probs`` could have made (targets' values are also range-checked by
    the ``index_checked`` rule)."""
    grad, log_probs, targets, nll, log_alpha = (a["grad"], a["log_probs"], a["targets"], a["neg_log_likelihood"],
                                                a["log_alpha"])
    if not all(_is_tensor(t) for t in (grad, log_probs, targets, nll, log_alpha)):
        return None
    if log_probs.dim() != 3:
        return f"argument 'log_probs' must be [time, batch, classes], not {list(log_probs.shape)}"
    steps, batch, classes = log_probs.shape
    inputs, lengths = _lengths(a["input_lengths"]), _lengths(a["target_lengths"])
    if inputs is None or lengths is None or len(inputs) != batch or len(lengths) != batch:
        return f"input_lengths and target_lengths must hold one integer per batch item ({batch})"
    if any(not 0 <= n <= steps for n in inputs) or any(n < 0 for n in lengths):
        return f"input_lengths must lie in [0, {steps}] and target_lengths must not be negative"
    blank = 0 if a.get("blank") is None else a["blank"]
    if type(blank) is not int or not 0 <= blank < classes:
        return f"blank {blank!r:.20} must be a class in [0, {classes})"
    longest = max(lengths, default=0)
    if targets.dtype not in INDEX_DTYPES or targets.dim() not in (1, 2):
        return "argument 'targets' must be a 1- or 2-dim int32 or int64 tensor"
    if targets.dim() == 1 and targets.numel() < sum(lengths):
        return f"argument 'targets' holds {targets.numel()} targets; target_lengths add up to {sum(lengths)}"
    if targets.dim() == 2 and (targets.shape[0] != batch or targets.shape[1] < longest):
        return f"argument 'targets' is {list(targets.shape)}; it must be [{batch}, at least {longest}]"
    for name, tensor in (("grad", grad), ("neg_log_likelihood", nll)):
        if list(tensor.shape) != [batch] or tensor.dtype != log_probs.dtype:
            return f"argument {name!r} is {tensor.dtype} {list(tensor.shape)}; it must be {log_probs.dtype} [{batch}]"
    if (log_alpha.dim() != 3 or list(log_alpha.shape[:2]) != [batch, steps] or log_alpha.shape[2] < 2 * longest + 1
            or log_alpha.dtype != log_probs.dtype):
        return (f"argument 'log_alpha' is {log_alpha.dtype} {list(log_alpha.shape)}; it must be {log_probs.dtype} "
                f"[{batch}, {steps}, at least {2 * longest + 1}]")
    return None


# ------------------------------------------------------------------------------------------------
# Lists a kernel indexes without checking their length
# ------------------------------------------------------------------------------------------------
def non_empty_tensors(a: Mapping[str, Any]) -> str | None:
    """``_stack(tensors, dim)`` (TensorShape.cpp) reads ``tensors[0]`` for the result's shape
    and dtype before any check: an empty list crashed the worker (SIGSEGV; found by
    scripts/fuzz_ops.py; the public ``stack`` checks first)."""
    tensors = a["tensors"]
    if isinstance(tensors, (list, tuple)) and not tensors:
        return "argument 'tensors' must hold at least one tensor"
    return None


def foreach_lists(a: Mapping[str, Any]) -> str | None:
    """``_foreach_*`` ops walk their tensor lists (and scalar lists) in step, by the length of the
    first; ``_foreach_copy`` with an empty ``self`` and four ``src`` tensors crashed the worker
    (SIGSEGV; found by scripts/fuzz_ops.py; most foreach kernels check the lengths, the generated
    functional and ``out`` forms do not). Every list argument holds one entry per tensor of the
    first."""
    lists = [(name, value) for name, value in a.items() if isinstance(value, (list, tuple))]
    if not lists:
        return None
    first, count = lists[0][0], len(lists[0][1])
    for name, value in lists[1:]:
        if len(value) != count:
            return f"argument {name!r} holds {len(value)} entries; {first!r} holds {count}: one each"
    return None


def exact_lengths(lengths: Mapping[str, int]) -> CallCheck:
    """The check that each fixed-size list argument (schema ``int[N]``, ``SymInt[N]``: name ->
    N) holds exactly N entries."""
    def check(a: Mapping[str, Any]) -> str | None:
        for name, length in lengths.items():
            value = a.get(name)
            if isinstance(value, (list, tuple)) and len(value) != length:
                return f"argument {name!r} holds {len(value)} entries; it must hold {length}"
        return None

    return check


#: Ops whose kernels index a fixed-size list argument (``SymInt[4] padding``, ``int[2]
#: kernel_size``) up to the size its schema declares, without checking the list's length:
#: ``reflection_pad1d_backward`` and ``reflection_pad2d_backward`` with ``padding=[]``,
#: ``replication_pad2d_backward.grad_input`` with ``[1, 0]``, ``fractional_max_pool2d_backward``
#: with ``output_size=[]``, ``_slow_conv2d_backward`` with ``padding=[]`` crashed the worker, and
#: ``slow_conv3d_forward`` with a short ``stride`` corrupted its heap, and
#: ``_nnpack_spatial_convolution`` with one-entry lists crashed (found by scripts/fuzz_ops.py).
#: Their lists must hold exactly that many entries (what every caller in torch passes). Pooling
#: and convolution entry points (``max_pool2d``, ``convolution``) take one entry for all dims,
#: or none for a default, and check: they are not listed.
EXACT_LENGTH_OPS = re.compile(r"^(reflection|replication)_pad[123]d|^_slow_conv2d|^slow_conv|^thnn_conv"
                              r"|^_conv_depthwise2d$|^conv_depthwise3d$|^fractional_max_pool[23]d"
                              r"|^_nnpack_spatial_convolution$")
#: Ops checked by pattern: every ``_foreach_*`` op.
PATTERN_CHECKS: tuple[tuple[re.Pattern[str], CallCheck], ...] = ((re.compile(r"^_foreach_"), foreach_lists),)


#: op name (no overload) -> its check. Overloads share their argument names.
CHECKS: dict[str, CallCheck] = {
    "_cdist_backward": cdist_backward,
    **{name: fused_optimizer for name in ("_fused_sgd_", "_fused_sgd", "_fused_adam_", "_fused_adam",
                                          "_fused_adamw_", "_fused_adamw", "_fused_adagrad_", "_fused_adagrad")},
    "segment_reduce": segment_reduce,
    "_weight_norm_interface": weight_norm_interface,
    "_weight_norm_interface_backward": weight_norm_interface_backward,
    "repeat_interleave": repeat_interleave,
    "_logcumsumexp": out_like_self,
    "_ctc_loss_backward": ctc_loss_backward,
    "_stack": non_empty_tensors,
}


def check_for(schema: torch.FunctionSchema) -> CallCheck | None:
    """The check of one overload: its op's, by name or pattern, and the exact lengths of its
    fixed-size lists where :data:`EXACT_LENGTH_OPS` says so; None when it has none."""
    op = schema.name.removeprefix("aten::")
    checks = [check for pattern, check in PATTERN_CHECKS if pattern.search(op)]
    if op in CHECKS:
        checks.append(CHECKS[op])
    if EXACT_LENGTH_OPS.search(op):
        # (Argument.N, the length of a fixed-size list argument, is missing from torch's stubs.)
        lengths = {a.name: a.N for a in schema.arguments if a.N is not None  # type: ignore[attr-defined]
                   and "List" in str(a.real_type)}
        if lengths:
            checks.append(exact_lengths(lengths))
    if len(checks) <= 1:
        return checks[0] if checks else None
    return lambda a: next((reason for check in checks if (reason := check(a)) is not None), None)


def run_check(check: CallCheck, arguments: Mapping[str, Any]) -> str | None:
    """Run ``check``: its reason, or None. A check that fails on arguments it cannot read (a
    list where a tensor belongs, a dim out of range) refuses the call with what went wrong."""
    try:
        return check(arguments)
    except (TypeError, ValueError, IndexError, RuntimeError, AttributeError, OverflowError) as exc:
        return f"its arguments could not be checked ({type(exc).__name__}: {str(exc)[:200]})"
