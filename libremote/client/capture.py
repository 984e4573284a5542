"""Whole-step capture: a training step recorded once, replayed by the daemon with one command.

Layer 3, the op path: the session records what the op path sends; :mod:`.cuda_graph` and
``torch.cuda.is_current_stream_capturing`` build on it.

``step = libremote.capture_step(train_step, x, y)`` runs ``train_step`` eagerly (warm-up: the
optimizer creates its state), then once more while the session *records* every command it sends.
The daemon stores that recording as a program. ``step(x, y)`` afterwards copies the new inputs into
the step's own input tensors and sends one REPLAY command: forward, backward and optimizer update
run on the daemon without the client dispatching a single op.

It is CUDA graphs' contract, and fails the same way when broken (with an error, not silently):

* inputs and outputs are static: ``step(...)`` returns the same output tensors each time, now
  holding the new values;
* nothing in the step may wait for the device (``.item()``, printing a tensor, ``.cpu()``) or send
  new host data (``torch.tensor(...)`` on the device): a replay sends no data and reads none;
* Python values are baked in: an optimizer must keep its step count on the device
  (``capturable=True`` for Adam/AdamW, as for CUDA graphs; torch raises otherwise), and a learning
  rate changed later by a scheduler does not reach the replay unless it is a tensor.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

from libremote_wire.messages import Cmd

from ..errors import CaptureError
from . import runtime
from .tensor import RemoteTensor

_program_ids = itertools.count(1)
_capturing = False


def is_capturing() -> bool:
    """Whether a step is being recorded now (``torch.cuda.is_current_stream_capturing()``)."""
    return _capturing


def begin_capture() -> int:
    """Mark a capture as underway (one at a time, as CUDA's); return the new step's id."""
    global _capturing
    if _capturing:
        raise CaptureError("libremote: a capture is already underway; captures run one at a time, as CUDA graphs' do")
    _capturing = True
    return next(_program_ids)


def end_capture() -> None:
    global _capturing
    _capturing = False


class CapturedStep:
    """A recorded step: call it with new inputs (same shapes and dtypes) to replay it."""

    def __init__(self, fn: Callable[..., Any], *example_inputs: Any, warmup: int = 1) -> None:
        # The daemon of the inputs' device (with several daemons: libremote/client/servers.py).
        device = next((value._device_index for value in example_inputs if isinstance(value, RemoteTensor)), None)
        self.session = runtime.current() if device is None else runtime.session_for(device)
        self.fn = fn  # keeps what the step closes over (model, optimizer, data) alive for replays
        self.static_inputs = [_static_copy(value) for value in example_inputs]
        for _ in range(warmup):
            fn(*self.static_inputs)
        self.session.synchronize()  # warm-up errors surface here, not in the recording
        self.outputs = self._record(fn)

    def _record(self, fn: Callable[..., Any]) -> Any:
        recording: list[Any] = []
        self.id = begin_capture()
        self.session.start_recording(recording)
        try:
            outputs = fn(*self.static_inputs)
            self.session.flush()
        finally:
            end_capture()
            self.session.stop_recording()
        if not any(isinstance(leaf, RemoteTensor) for leaf in pytree.tree_leaves(outputs)) and outputs is not None:
            raise CaptureError("libremote: a captured step must return remote tensors (or None), "
                               f"not {type(outputs).__name__}")
        self.op_count = sum(1 for command in recording if command[0] in (Cmd.OP, Cmd.RUN_GRAPH))
        self.session.submit([Cmd.PROGRAM, self.id, recording])
        self.session.synchronize()  # the daemon checked the recording: errors surface here
        return outputs

    def __call__(self, *inputs: Any) -> Any:
        if len(inputs) != len(self.static_inputs):
            raise TypeError(f"this captured step takes {len(self.static_inputs)} inputs, got {len(inputs)}")
        if self.session.closed:
            raise CaptureError("libremote: the session this step was captured in is closed; capture it again")
        for static, new in zip(self.static_inputs, inputs):
            if isinstance(static, torch.Tensor):
                if not isinstance(new, torch.Tensor) or new.shape != static.shape or new.dtype != static.dtype:
                    raise ValueError(
                        f"a captured step's inputs keep their shape and dtype: expected {tuple(static.shape)} "
                        f"{static.dtype}, got {getattr(new, 'shape', type(new).__name__)}"
                    )
                if new is not static:
                    with torch.no_grad():
                        static.copy_(new)
            elif new != static:
                raise ValueError(f"a captured step's non-tensor inputs are baked in: expected {static!r}, got {new!r}")
        if self.session.op_log is not None:
            self.session.op_log.append(f"libremote::replay({self.op_count} ops)")
        self.session.submit([Cmd.REPLAY, self.id])
        return self.outputs


def _static_copy(value: Any) -> Any:
    if isinstance(value, RemoteTensor):
        return value.detach().clone()
    if isinstance(value, torch.Tensor):
        return value.to("cuda")
    return value


def capture_step(fn: Callable[..., Any], *example_inputs: Any, warmup: int = 1) -> CapturedStep:
    """Record ``fn(*example_inputs)`` (after ``warmup`` eager runs) as one daemon-side program;
    see the module docstring for the contract."""
    return CapturedStep(fn, *example_inputs, warmup=warmup)
