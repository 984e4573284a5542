"""``torch.compile`` while libremote is active: the program runs eagerly, op by op.

TorchDynamo cannot trace remote tensors yet (it would need them to be traceable subclasses and
a libremote backend that ships graphs to the daemon; that graph mode is planned). Rather than
fail deep inside Dynamo, ``torch.compile`` returns the model or function unchanged, with a
one-time warning, so programs that compile keep working with correct results.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable

import torch

_original_compile = torch.compile
_warned = False


def _warn_once() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            "libremote: torch.compile is not supported for remote tensors yet; the program runs "
            "eagerly (op by op) with the same results. Graph mode is planned.",
            UserWarning,
            stacklevel=3,
        )


@functools.wraps(_original_compile)
def compile(model: Any = None, *args: Any, **kwargs: Any) -> Any:  # noqa: A001 (torch's name)
    _warn_once()
    if model is None:  # used as @torch.compile(...) with arguments
        def decorate(target: Callable[..., Any]) -> Any:
            return target

        return decorate
    return model


def install() -> None:
    torch.compile = compile


def uninstall() -> None:
    torch.compile = _original_compile
