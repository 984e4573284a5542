"""Warnings point at the program's line, as on CUDA (libremote/client/warning_location.py).

Every torch call passes through libremote's device mode, ops on remote tensors infer their output
on meta stand-ins, and libremote warns itself from deep call paths: without care the warnings'
``filename`` is a libremote file. Each test checks ``w.filename`` is this file (and the line).
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F


def caught_at(call: Callable[[], Any]) -> list[tuple[str, int, str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [(w.filename, w.lineno, str(w.message)) for w in caught]


def line_of(call: Callable[[], Any]) -> int:
    return inspect.getsourcelines(call)[1]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_torch_warnings_in_calls_point_at_the_calling_line(remote, device):
    x = torch.randn(3, 4, device=device)
    cases = [
        (lambda: torch.tensor(x), "To copy construct from a tensor"),      # C++ warning
        (lambda: F.softmax(x), "Implicit dimension choice for softmax"),   # Python, stacklevel=3
    ]
    for call, text in cases:
        [(filename, line, message)] = caught_at(call)
        assert text in message
        assert (filename, line) == (__file__, line_of(call))


def test_warnings_from_an_ops_shape_inference_point_at_the_op_each_time(remote):
    x = torch.randn(4, device="cuda")
    out = torch.empty(2, device="cuda")  # torch resizes it, with a warning
    first = lambda: torch.add(x, x, out=out)  # noqa: E731
    [(filename, line, message)] = caught_at(first)
    assert "An output with one or more elements was resized" in message
    assert (filename, line) == (__file__, line_of(first))
    out = torch.empty(2, device="cuda")
    again = lambda: torch.add(x, x, out=out)  # noqa: E731  (the same op and shapes: warns again)
    [(filename, line, _)] = caught_at(again)
    assert (filename, line) == (__file__, line_of(again))


def test_default_filter_shows_a_warning_once_per_program_line(remote):
    x = torch.randn(3, device="cuda")
    repeated = lambda: torch.tensor(x)  # noqa: E731
    elsewhere = lambda: torch.tensor(x)  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            repeated()
        elsewhere()
    assert [(w.filename, w.lineno) for w in caught] == [(__file__, line_of(repeated)), (__file__, line_of(elsewhere))]


def test_warnings_as_errors_raise_at_the_call(remote):
    x = torch.randn(3, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="To copy construct from a tensor"):
            torch.tensor(x)


def test_libremotes_own_warning_points_at_the_program_line(remote):
    model = torch.nn.Linear(3, 2)
    watcher = weakref.ref(model.weight)  # noqa: F841  (keeps the parameter from being rebound: libremote warns)
    call = lambda: model.cuda()  # noqa: E731
    found = [w for w in caught_at(call) if "libremote" in w[2]]
    assert found and all((filename, line) == (__file__, line_of(call)) for filename, line, _ in found)


def test_graph_modes_eager_fallback_warning_points_at_the_call(remote):
    def reads_a_value(t):
        return t * 2 if t.sum() > 0 else t

    compiled = torch.compile(reads_a_value)
    call = lambda: compiled(torch.ones(3, device="cuda"))  # noqa: E731
    found = [(filename, line) for filename, line, message in caught_at(call) if "runs eagerly" in message]
    assert found == [(__file__, line_of(call))]
