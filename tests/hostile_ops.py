"""Allowed ops paired with hostile tensors: a schema-driven generator of calls and a raw client that
runs them against a real worker, one op per round trip, counting what each did.

Issue 19: ATen has ~2,700 overloads the op rules allow (server/worker/op_rules.py), many on the
strength of "the kernel checks its inputs". Probing by hand found kernels that do not
(``_cdist_backward``, ``_fused_sgd_``, ``segment_reduce``...). This module looks for more the
way an attacker would: for each allowed overload it builds argument lists from the schema, mostly
plausible (so that calls get past the first checks) with hostile choices mixed in: tensors of
mismatched shapes, empty tensors, wrong dtypes, views that are not contiguous (transposed,
expanded, strided, offset), index, offset and length tensors holding values at +-2**40, lists of
the wrong length, negative and huge sizes. Each call travels in one batch that builds its tensors
(PUT or a factory op), runs the op (OP_SYNC) and frees them, so a call is self-contained and
replays exactly in a fresh session.

Outcomes: the worker answered (the op succeeded, or failed with an error: the kernel's own check,
a rule's refusal, out of memory), or the worker died (a crash: SIGSEGV, SIGABRT...; or the
daemon's ``--op-time-limit``: a kernel that hangs, as heap corruption often ends). The front then
starts a fresh worker for the next session. A crash is a kernel that trusted its arguments: each
one found becomes an op rule (a refusal or a per-call check) with a test (tests/test_findings.py).

Used by tests/test_hostile_ops.py (a few hundred calls in CI) and scripts/fuzz_ops.py (millions).
"""

from __future__ import annotations

import collections
import math
import random
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch
import zmq

from libremote_wire import codec, torch_codec
from libremote_wire.messages import Cmd, Msg

from raw_client import RawClient

# ------------------------------------------------------------------------------------------------
# The overloads to call
# ------------------------------------------------------------------------------------------------
#: Ops left out of the campaign, and why: not because they crash (those are what we look for) but
#: because they would measure the test machine rather than the daemon.
SKIPPED_OPS = re.compile(
    r"^aten::(_?fft_|_cufft)"  # FFT plans of huge sizes from small int arguments: slow, not unsafe
    r"|^aten::(linalg_eig|_linalg_eig|linalg_eigvals)"  # LAPACK on arbitrary matrices: seconds, checked inputs
)


def allowed_overloads() -> list[str]:
    """Every registered aten overload the daemon's op rules allow (``op_policy.resolve`` succeeds
    with the rules on), but :data:`SKIPPED_OPS`: the same list whether the daemon under test runs
    with or without its rules."""
    from libremote_server.worker import op_policy

    names = []
    for name in sorted(torch._C._dispatch_get_all_op_names()):
        if not name.startswith("aten::") or SKIPPED_OPS.search(name):
            continue
        try:
            op_policy.resolve(name)
        except op_policy.OpRefused:
            continue
        names.append(name)
    return names


def schema_of(name: str) -> torch.FunctionSchema:
    op, _, overload = name.removeprefix("aten::").partition(".")
    return getattr(getattr(torch.ops.aten, op), overload or "default")._schema


# ------------------------------------------------------------------------------------------------
# Tensors: described, then built in the worker
# ------------------------------------------------------------------------------------------------
#: Index-like argument names: their tensors get integer values, in range or far out of it.
INDEX_NAMES = re.compile(r"ind|offset|length|target|repeats|count|bag|argmax|perm|label|boundar|sorted_seq"
                         r"|seq|batch_sizes|crow|col|row|segment|mask")
#: Values an index tensor may hold: a few in range for small tensors, and hostile ones.
HOSTILE_INDEX_VALUES = (-1, -2, 2**30, 2**40, -(2**40), 2**62, 7, 100)
#: Shapes a call's tensors share by default (so that most calls pass shape checks).
BASE_SHAPES = ((4,), (2, 3), (2, 3, 4), (1, 2, 3, 4), (3, 3), (2, 2, 2, 2, 2), (2, 3, 4, 5))
#: Shapes a hostile tensor takes instead: empty, scalar, one element, mismatched, large.
HOSTILE_SHAPES = ((), (0,), (1,), (2, 0), (1, 1), (7,), (3, 1, 2), (5, 5), (1, 1, 1), (1 << 14,), (1 << 20,),
                  (1 << 10, 1 << 8), (2, 3, 4, 5, 6))
#: Dtypes a hostile tensor takes instead of float32.
HOSTILE_DTYPES = (torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int8, torch.uint8,
                  torch.bool, torch.complex64)
#: Views that are not plain contiguous tensors: kernels that walk raw pointers over ``numel``
#: elements go wrong on them.
VIEWS = ("transpose", "expand", "strided", "offset")
#: Tensors up to this many elements travel in the batch (PUT); larger ones are made by a factory.
PUT_LIMIT = 4096


@dataclass(frozen=True)
class TensorSpec:
    """A tensor argument: dtype, shape, what it holds, and the view that makes it."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    #: "ramp" (values spread over [-2, 2]), "small" (0, 1, 2: valid indices of small tensors),
    #: "hostile" (:data:`HOSTILE_INDEX_VALUES` among small ones), "ones", "zeros"; or the values
    #: themselves (a tuple, for the calls of :data:`KNOWN_CRASHES`).
    values: str | tuple[float, ...] = "ramp"
    view: str = ""
    seed: int = 0

    def base_shape(self) -> tuple[int, ...]:
        """The shape of the contiguous tensor the view is made from."""
        if not self.shape or not self.view:
            return self.shape
        first, rest = self.shape[0], self.shape[1:]
        if self.view == "expand":
            return (1, *rest)
        if self.view == "strided":
            return (2 * first, *rest)
        if self.view == "offset":
            return (first + 1, *rest)
        return tuple(reversed(self.shape)) if len(self.shape) > 1 else self.shape  # transpose

    def base(self) -> torch.Tensor:
        """The contiguous tensor to PUT (deterministic: a replay sends the same bytes)."""
        shape = self.base_shape()
        numel = math.prod(shape)
        rng = random.Random(self.seed)
        if isinstance(self.values, tuple):
            values = torch.tensor(self.values, dtype=torch.float64)
        elif self.values == "ramp":
            values = torch.linspace(-2.0, 2.0, numel, dtype=torch.float64) if numel else torch.zeros(0, dtype=torch.float64)
        elif self.values in ("small", "hostile"):
            pool = (0, 1, 2) if self.values == "small" else (0, 1, 2) + HOSTILE_INDEX_VALUES
            values = torch.tensor([rng.choice(pool) for _ in range(numel)], dtype=torch.float64)
            if self.values == "hostile" and numel:
                values[rng.randrange(numel)] = rng.choice(HOSTILE_INDEX_VALUES)  # at least one
        else:
            values = torch.full((numel,), 1.0 if self.values == "ones" else 0.0, dtype=torch.float64)
        if self.dtype.is_floating_point or self.dtype.is_complex:
            return values.reshape(shape).to(self.dtype)
        if self.dtype is torch.bool:
            return (values.reshape(shape) != 0)
        info = torch.iinfo(self.dtype)
        return values.to(torch.int64).clamp(info.min, info.max).reshape(shape).to(self.dtype) if numel else \
            torch.zeros(shape, dtype=self.dtype)

    def describe(self) -> str:
        view = f", {self.view}" if self.view else ""
        return f"T({str(self.dtype).removeprefix('torch.')}, {list(self.shape)}, {self.values}{view})"


def _build(spec: TensorSpec, handle: int, views_from: int, commands: list[Any], frames: list[bytes]) -> int:
    """Append the commands that make ``spec`` at ``handle`` (its contiguous base first, at
    ``views_from`` + handle when it is a view). Returns the handle the argument names."""
    shape = spec.base_shape()
    base_handle = handle + views_from if spec.view and spec.shape else handle
    if math.prod(shape) <= PUT_LIMIT or spec.values not in ("ones", "zeros", "ramp"):  # (tuples are small)
        tensor = spec.base().contiguous() if math.prod(shape) <= PUT_LIMIT else \
            torch.zeros(shape, dtype=spec.dtype)
        frames.append(bytes(torch_codec.tensor_bytes(tensor)))
        commands.append([Cmd.PUT, base_handle, torch_codec.dtype_ext(spec.dtype), list(shape),
                         list(tensor.stride()), 0, len(frames)])
    else:  # large: made in the worker, not sent
        fill = 0.0 if spec.values == "zeros" else 1.0
        commands.append([Cmd.OP, [1, "aten::full"], [list(shape), fill],
                         {"dtype": torch_codec.dtype_ext(spec.dtype)}, [base_handle]])
    if base_handle == handle:
        return handle
    source = codec.handle_ext(base_handle)
    if spec.view == "expand":
        view = [Cmd.OP, [2, "aten::expand"], [source, list(spec.shape)], {}, [handle]]
    elif spec.view == "strided":
        view = [Cmd.OP, [3, "aten::slice.Tensor"], [source, 0, 0, None, 2], {}, [handle]]
    elif spec.view == "offset":
        view = [Cmd.OP, [3, "aten::slice.Tensor"], [source, 0, 1], {}, [handle]]
    else:
        view = [Cmd.OP, [4, "aten::permute"], [source, list(reversed(range(len(spec.shape))))], {}, [handle]]
    commands.append(view)
    return handle


# ------------------------------------------------------------------------------------------------
# Calls
# ------------------------------------------------------------------------------------------------
@dataclass
class Call:
    """One op with its arguments: plain values, :class:`TensorSpec` where tensors go (lists of
    them for ``Tensor[]``)."""

    name: str
    args: list[Any]
    kwargs: dict[str, Any]

    def specs(self) -> Iterator[TensorSpec]:
        def walk(value: Any) -> Iterator[TensorSpec]:
            if isinstance(value, TensorSpec):
                yield value
            elif isinstance(value, (list, tuple)):
                for item in value:
                    yield from walk(item)
        yield from walk(self.args)
        yield from walk(list(self.kwargs.values()))

    def batch(self, op_id: int) -> tuple[list[Any], list[bytes], list[int]]:
        """The commands (build the tensors, OP_SYNC the op as ``op_id``, free everything), their
        frames, and the handles they use."""
        commands: list[Any] = []
        frames: list[bytes] = []
        handles: list[int] = []
        views_from = 1000

        def wire(value: Any) -> Any:
            if isinstance(value, TensorSpec):
                handle = len(handles) + 1
                _build(value, handle, views_from, commands, frames)
                handles.append(handle)
                if value.view and value.shape:
                    handles.append(handle + views_from)
                return codec.handle_ext(handle)
            if isinstance(value, list):
                return [wire(item) for item in value]
            return value

        args = [wire(value) for value in self.args]
        kwargs = {key: wire(value) for key, value in self.kwargs.items()}
        outs = [None] * len(schema_of(self.name).returns)
        commands.append([Cmd.OP_SYNC, [op_id, self.name], args, kwargs, outs])
        commands.append([Cmd.FREE, handles])
        # (Freed first too: a batch a protocol error cut short left its tensors behind.)
        return [[Cmd.FREE, handles], *commands], frames, handles

    def describe(self) -> str:
        """The call as a reader would write it (for reports and tests)."""
        def text(value: Any) -> str:
            if isinstance(value, TensorSpec):
                return value.describe()
            if isinstance(value, list):
                return "[" + ", ".join(text(item) for item in value) + "]"
            if isinstance(value, msgpack.ExtType):  # dtypes, devices, layouts, complex numbers
                decoded = torch_codec.unpackb(msgpack.packb(value))
                return "device" if isinstance(decoded, codec.DeviceRef) else repr(decoded)
            return repr(value)
        parts = [text(value) for value in self.args] + [f"{key}={text(value)}" for key, value in self.kwargs.items()]
        return f"{self.name}({', '.join(parts)})"


def _t(*shape: int, values: str | tuple[float, ...] = "ramp", dtype: torch.dtype = torch.float32) -> TensorSpec:
    return TensorSpec(dtype, shape, values)


_SGD = dict(weight_decay=0.0, momentum=0.9, lr=0.1, dampening=0.0, nesterov=False, maximize=False, is_first_step=False)
#: Calls that crashed (or hung) a worker before their op rules (tests/test_findings.py has each
#: with its story): with the rules on each is refused; with them off each ends its own worker.
KNOWN_CRASHES = [
    Call("aten::_fused_adagrad_", [[_t(1 << 16, values="ones")], [_t(1 << 16, values="ones")], [_t(1, values="ones")],
                                   [_t(values="zeros")]],
         dict(lr=0.1, lr_decay=0.0, weight_decay=0.0, eps=1e-10, maximize=False)),
    Call("aten::embedding_backward", [_t(2, 3), _t(2, values=(2**40, -(2**40)), dtype=torch.int64), 4, -1, True, False], {}),
    Call("aten::ctc_loss.IntList", [_t(5, 1, 4), _t(1, 1, values=(2**40,), dtype=torch.int64), [5], [1]], {}),
    Call("aten::segment_reduce", [_t(4, values="ones"), "sum"], {"offsets": _t(2, values=(0, 2**30), dtype=torch.int64)}),
    Call("aten::repeat_interleave.self_Tensor", [_t(2), _t(2, values=(-5, 10), dtype=torch.int64), 0], {"output_size": 5}),
    Call("aten::_stack", [[], 0], {}),
    Call("aten::_foreach_copy", [[_t(2)], [_t(2), _t(2), _t(2), _t(2)]], {}),
    Call("aten::reflection_pad1d_backward", [_t(2, 3, 4), _t(2, 3, 4), []], {}),
    Call("aten::_weight_norm_interface", [_t(0), _t(2, 2, 2, 2, 2)], {}),
]


#: Strings by argument name (the generic pool for others).
STRINGS = {
    "reduce": ("sum", "mean", "max", "min", "prod", "amax", "amin", "none", "bogus"),
    "reduction": ("sum", "mean", "none", "bogus"),
    "mode": ("reflect", "constant", "replicate", "circular", "bilinear", "nearest", "bicubic", "bogus"),
    "padding_mode": ("zeros", "border", "reflection", "bogus"),
    "rounding_mode": ("trunc", "floor", "bogus"),
    "approximate": ("none", "tanh", "bogus"),
    "indexing": ("ij", "xy"),
    "side": ("left", "right"),
    "UPLO": ("L", "U", "X"),
    "uplo": ("L", "U"),
    "interpolation": ("linear", "lower", "higher", "midpoint", "nearest", "bogus"),
    "padding": ("same", "valid"),
}
GENERIC_STRINGS = ("", "sum", "L", "none", "reflect", "bogus")
DTYPES = (torch.float32, torch.float64, torch.int64, torch.int32, torch.float16, torch.bfloat16, torch.bool,
          torch.complex64, torch.uint8, torch.int8)
FLOATS = (0.0, 1.0, -1.0, 0.5, 2.0, 1e-5, math.nan, math.inf, -math.inf, 1e300, -3.0)
DIMS = (0, 1, -1, -2, 2, 3, 5, -100)
SMALL_INTS = (0, 1, 2, 3, -1, 4, 2, 1)
HOSTILE_INTS = (-1, -2, 2**31, -(2**40), 2**40, 2**62, 1 << 20, 100)


class HostileCalls:
    """Random calls of allowed overloads with hostile arguments, from their schemas. Seeded:
    the same seed gives the same calls."""

    def __init__(self, seed: int = 0, names: list[str] | None = None) -> None:
        self.rng = random.Random(seed)
        self.names = names if names is not None else allowed_overloads()
        self._schemas: dict[str, torch.FunctionSchema] = {}
        self._base: tuple[int, ...] = BASE_SHAPES[0]
        self._hostility = 0.25

    def call(self, name: str | None = None) -> Call:
        rng = self.rng
        name = name or rng.choice(self.names)
        schema = self._schemas.get(name) or self._schemas.setdefault(name, schema_of(name))
        self._base = rng.choice(BASE_SHAPES)
        self._hostility = rng.choice((0.1, 0.25, 0.5))  # how many arguments go hostile in this call
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        by_name = False  # once a defaulted positional argument is left out, the rest go by name
        for argument in schema.arguments:
            if argument.has_default_value() and rng.random() < 0.4:
                by_name = by_name or not argument.kwarg_only
                continue
            value = self.value(argument.name, str(argument.real_type))
            if argument.kwarg_only or by_name:
                kwargs[argument.name] = value
            else:
                args.append(value)
        return Call(name, args, kwargs)

    # -- values by type ----------------------------------------------------------------------
    def value(self, name: str, type_name: str) -> Any:
        rng = self.rng
        if type_name.startswith("Optional["):
            if rng.random() < 0.3:
                return None
            type_name = type_name[len("Optional["):-1]
        if type_name == "Tensor":
            return self.tensor(name)
        if type_name in ("List[Tensor]", "List[Optional[Tensor]]"):
            count = rng.choice((0, 1, 2, 2, 3, 4))
            return [None if type_name.endswith("Optional[Tensor]]") and rng.random() < 0.2 else self.tensor(name)
                    for _ in range(count)]
        if type_name == "int":
            return self.integer(name)
        if type_name == "List[int]":
            return self.int_list(name)
        if type_name == "float":
            return rng.choice(FLOATS)
        if type_name == "List[float]":
            return [rng.choice(FLOATS) for _ in range(rng.choice((0, 1, 2, len(self._base))))]
        if type_name == "bool":
            return rng.random() < 0.5
        if type_name == "List[bool]":
            return [rng.random() < 0.5 for _ in range(rng.choice((1, 2, 3, 4)))]
        if type_name == "number":
            return rng.choice((1, 0, -1, 2, 0.5, 2**40, -(2**40), math.nan, 3.0))
        if type_name == "List[number]":
            return [rng.choice((1, 0, -1, 2.5)) for _ in range(rng.choice((0, 1, 2, 3)))]
        if type_name == "complex":
            return codec.complex_ext(complex(rng.choice(FLOATS), 1.0))
        if type_name == "str":
            return rng.choice(STRINGS.get(name, GENERIC_STRINGS))
        if type_name == "ScalarType":
            return torch_codec.dtype_ext(rng.choice(DTYPES))
        if type_name == "Layout":
            return torch_codec.layout_ext(torch.strided)
        if type_name == "MemoryFormat":
            return torch_codec.memory_format_ext(rng.choice(
                (torch.contiguous_format, torch.channels_last, torch.preserve_format, torch.channels_last_3d)))
        if type_name == "Device":
            return codec.device_ext(0)
        return None  # Generator (the session's own), and anything else

    def _hostile(self) -> bool:
        return self.rng.random() < self._hostility

    def tensor(self, name: str) -> TensorSpec:
        rng = self.rng
        seed = rng.randrange(1 << 30)
        shape = self._base
        if self._hostile():
            shape = rng.choice(HOSTILE_SHAPES + BASE_SHAPES)
        view = rng.choice(VIEWS) if self._hostile() and shape else ""
        if INDEX_NAMES.search(name) and "weight" not in name:
            dtype = torch.int64 if not self._hostile() else rng.choice((torch.int32, torch.float32, torch.int64))
            values = "hostile" if self._hostile() or rng.random() < 0.3 else "small"
            if math.prod(shape) > PUT_LIMIT:  # large index tensors: in range (zeros)
                values = "zeros"
            return TensorSpec(dtype, shape, values, view, seed)
        dtype = rng.choice(HOSTILE_DTYPES) if self._hostile() else torch.float32
        values = "ramp" if rng.random() < 0.8 else rng.choice(("ones", "zeros", "small"))
        if math.prod(shape) > PUT_LIMIT and values == "small":
            values = "ones"
        return TensorSpec(dtype, shape, values, view, seed)

    def integer(self, name: str) -> int:
        rng = self.rng
        if self._hostile():
            return rng.choice(HOSTILE_INTS)
        if "dim" in name or name in ("axis", "axis0", "axis1", "start_dim", "end_dim"):
            return rng.choice(DIMS[:5])
        return rng.choice(SMALL_INTS)

    def int_list(self, name: str) -> list[int]:
        rng = self.rng
        if self._hostile():
            return [rng.choice(HOSTILE_INTS + SMALL_INTS) for _ in range(rng.choice((0, 1, 2, 3, 5)))]
        if name in ("size", "sizes", "shape", "output_size"):
            return list(self._base)
        if "dim" in name:
            return rng.choice(([0], [-1], [0, 1], [1]))
        return [rng.choice((1, 1, 2, 0)) for _ in range(rng.choice((1, 2, 2, 3)))]


# ------------------------------------------------------------------------------------------------
# Running calls against a worker
# ------------------------------------------------------------------------------------------------
#: The op id every call names its op by (with the name each time: ids are per session and bounded).
TARGET_OP_ID = 10
#: Calls a fresh worker runs before any other: the worker's first op whose quota check runs a
#: Python meta kernel imports torch._dynamo and sympy (2-4 s on the 2-core VM), which would
#: otherwise count against --op-time-limit as a hang of whatever call happens to come first.
WARM_UP = [Call("aten::_foreach_cos.out", [[TensorSpec(torch.float32, (2, 3, 4, 5), "zeros")]],
                {"out": [TensorSpec(torch.int32, (2, 3, 4, 5)), TensorSpec(torch.float32, (3, 3))]}),
           Call("aten::hardswish_backward.out", [TensorSpec(torch.float16, (2, 3)),
                                                 TensorSpec(torch.int8, (16384,), "ones", "expand")],
                {"out": TensorSpec(torch.int8, (2, 3, 4, 5, 6))})]
#: How a call ended.
OK, ERROR, CRASH, TIME_LIMIT, NO_ANSWER = "succeeded", "error", "crash", "time limit", "no answer"


@dataclass
class Outcome:
    kind: str
    detail: str = ""  # the error's kind and message, or why the worker ended


@dataclass
class Tally:
    """What a campaign's calls did: counts per outcome, crashes per op with an example call."""

    counts: collections.Counter = field(default_factory=collections.Counter)
    errors: collections.Counter = field(default_factory=collections.Counter)  # by error kind
    deaths: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)  # op -> [(kind, call, why)]
    replayed: dict[str, list[bool]] = field(default_factory=dict)  # op -> [crashed again alone?]
    before: dict[str, str] = field(default_factory=dict)  # op -> the call before its last loss

    def add(self, call: Call, outcome: Outcome) -> None:
        self.counts[outcome.kind] += 1
        if outcome.kind == ERROR:
            self.errors[outcome.detail.split(":", 1)[0]] += 1
        elif outcome.kind in (CRASH, TIME_LIMIT, NO_ANSWER):
            self.deaths.setdefault(call.name, []).append((outcome.kind, call.describe(), outcome.detail))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        lines = [f"{self.total} ops: " + ", ".join(f"{kind} {self.counts[kind]}"
                                                  for kind in (OK, ERROR, CRASH, TIME_LIMIT, NO_ANSWER)),
                 "errors by kind: " + ", ".join(f"{kind} {n}" for kind, n in self.errors.most_common())]
        if self.deaths:
            lines.append("workers lost, per op (crash / time limit / no answer; replayed alone in a fresh worker):")
            for name, deaths in sorted(self.deaths.items(), key=lambda item: -len(item[1])):
                kinds = collections.Counter(kind for kind, _, _ in deaths)
                replays = self.replayed.get(name, [])
                again = f"; alone: {sum(replays)}/{len(replays)} again" if replays else ""
                lines.append(f"  {name}: {kinds[CRASH]} / {kinds[TIME_LIMIT]} / {kinds[NO_ANSWER]}{again}")
                lines.append(f"      e.g. {deaths[0][1][:600]}")
                lines.append(f"      ({deaths[0][2][:110]})")
                if replays and not all(replays):
                    lines.append(f"      after {self.before.get(name, '')[:400]}")
        return "\n".join(lines)


class OpFuzzer:
    """A raw client of one tenant that runs :class:`Call` objects in its worker, one per round
    trip, and opens a new session (in the fresh worker the front starts) when its worker dies."""

    def __init__(self, address: str, tenant: str, token: str, *, answer_wait_s: float = 30.0,
                 warm_up: bool = True) -> None:
        """``warm_up``: run :data:`WARM_UP` in each fresh worker first (needed under an
        --op-time-limit shorter than a few seconds)."""
        self.address, self.tenant, self.token = address, tenant, token
        self.warm_up = warm_up
        #: How long to wait for an answer: longer than the daemon's --op-time-limit.
        self.answer_wait_s = answer_wait_s
        self.client: RawClient | None = None
        self.sessions = 0
        self.worker_pids: list[int] = []

    def _connect(self) -> None:
        if self.client is not None:
            self.client.close(goodbye=False)
        self.client = RawClient(self.address)
        header = self.client.hello(tenant=self.tenant, token=self.token)
        assert header[0] == Msg.WELCOME, header
        self.sessions += 1
        if header[1]["pid"] not in self.worker_pids:  # a fresh worker: warm it up first
            self.worker_pids.append(header[1]["pid"])
            for call in WARM_UP if self.warm_up else ():
                commands, frames, _ = call.batch(TARGET_OP_ID)
                how, answer, _ = await_reply(self.client, self.client.batch(commands, frames), self.answer_wait_s)
                assert how == "reply", f"a fresh worker did not survive its warm-up (--op-time-limit too short?): {answer}"

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def run(self, call: Call) -> Outcome:
        """Run one call; on a lost worker, the next call opens a new session."""
        if self.client is None:
            self._connect()
        client = self.client
        commands, frames, _ = call.batch(TARGET_OP_ID)
        how, answer, _ = await_reply(client, client.batch(commands, frames), self.answer_wait_s)
        if how == "reply":
            error = answer[3]
            return Outcome(OK) if error is None else Outcome(ERROR, f"{error[0]}: {error[2][:300]}")
        self.client = None
        client.close(goodbye=False)
        if how == "lost":
            return Outcome(TIME_LIMIT if "--op-time-limit" in answer else CRASH, answer)
        return Outcome(NO_ANSWER, answer)


def await_reply(client: RawClient, seq: int, wait_s: float) -> tuple[str, Any, list[bytes]]:
    """Wait for the worker's reply to batch ``seq``, or the front's word that the worker ended:
    ``("reply", header, frames)``, ``("lost", why, [])`` (a crash, the op time limit: the client
    must open a new session), or ``("silent", what, [])`` after ``wait_s``."""
    poller = zmq.Poller()
    poller.register(client.worker, zmq.POLLIN)
    poller.register(client.front, zmq.POLLIN)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        ready = dict(poller.poll(int((deadline - time.monotonic()) * 1000) + 1))
        if client.worker in ready:
            header, *frames = client.worker.recv_multipart()
            reply = torch_codec.unpackb(header)
            if reply[0] == Msg.REPLY and reply[1] == seq:
                return "reply", reply, frames
        if client.front in ready:
            notice = codec.unpackb(client.front.recv())
            return "lost", notice[3][2] if notice[0] == Msg.REPLY and notice[3] else repr(notice)[:300], []
    return "silent", f"no answer within {wait_s:g} s", []


def campaign(fuzzer: OpFuzzer, calls: HostileCalls, count: int, *, replay: bool = False,
             names: list[str] | None = None, report_every_s: float = 0.0,
             stop: Callable[[], Any] | None = None) -> Tally:
    """Run ``count`` calls (of ``names`` in turn if given, else of overloads drawn at random);
    with ``replay``, each call that lost its worker runs once more, alone in a fresh worker, to
    tell a crash of its own from heap corruption an earlier call left behind (the call before it
    is reported with it). Ends early when ``stop()`` returns something (the daemon exited)."""
    tally = Tally()
    started = last = time.monotonic()
    previous = ""
    for index in range(count):
        call = calls.call(names[index % len(names)] if names else None)
        outcome = fuzzer.run(call)
        tally.add(call, outcome)
        if outcome.kind in (CRASH, TIME_LIMIT, NO_ANSWER):
            tally.before[call.name] = previous
            if replay:  # (the worker that ran it is gone: this runs in a fresh one)
                tally.replayed.setdefault(call.name, []).append(fuzzer.run(call).kind in (CRASH, TIME_LIMIT, NO_ANSWER))
        previous = call.describe()
        if stop is not None and stop() is not None:
            break
        if report_every_s and time.monotonic() - last > report_every_s:
            last = time.monotonic()
            print(f"{tally.total} calls, {tally.total / (last - started):.0f}/s: "
                  + ", ".join(f"{k} {n}" for k, n in tally.counts.items()), flush=True)
    return tally


# ------------------------------------------------------------------------------------------------
# Another tenant, watching
# ------------------------------------------------------------------------------------------------
#: The bystander's secret: an int64 value no hostile call produces by chance.
SECRET = 0x5EC2E7_B1_5EC2


class Bystander:
    """Another tenant's session that lives through a campaign: it holds a secret in its own
    worker, and :meth:`problems` says whether anything of it changed."""

    def __init__(self, address: str, tenant: str, token: str) -> None:
        self.address = address
        self.client = RawClient(address)
        header = self.client.hello(tenant=tenant, token=token)
        assert header[0] == Msg.WELCOME, header
        self.tenant, self.token, self.worker = tenant, token, header[1]["pid"]
        self.client.put(1, torch.full((4096,), SECRET, dtype=torch.int64))

    def problems(self) -> list[str]:
        """What is wrong: its worker replaced, its secret changed, a result not exact."""
        found = []
        held = bytes(self.client.fetch(1).numpy().tobytes())
        if held.count(SECRET.to_bytes(8, "little", signed=True)) != 4096:
            found.append("the bystander's secret changed")
        a = torch.arange(-12.0, 12.0).reshape(4, 6)
        self.client.put(2, a)
        _, error, _ = self.client.call([[Cmd.OP_SYNC, [1, "aten::t"], [codec.handle_ext(2)], {}, [3]],
                                        [Cmd.OP_SYNC, [2, "aten::mm"], [codec.handle_ext(2), codec.handle_ext(3)], {}, [4]]])
        if error is not None or not self.client.fetch(4).equal(a @ a.t()):
            found.append(f"the bystander's result is not exact ({error})")
        self.client.call([[Cmd.FREE, [2, 3, 4]]])
        with RawClient(self.address) as again:
            pid = again.hello(tenant=self.tenant, token=self.token)[1]["pid"]
        if pid != self.worker:
            found.append(f"the bystander's worker changed ({self.worker} -> {pid})")
        return found

    def close(self) -> None:
        self.client.close()
