"""Warnings point at the program's line, not at libremote's frames.

Layer 1 (it imports nothing of the client): every layer warns through :func:`warn`, and
:mod:`.patches` puts :func:`_showwarnmsg` in ``warnings``.

Python attributes a warning to a frame: ``warnings.warn(..., stacklevel=n)`` to the n-th frame up
from the call, and a C++ ``TORCH_WARN`` to the innermost Python frame running when it fires. With
libremote in between, that frame is often libremote's:

* every torch API call passes through the device mode's ``__torch_function__``
  (:mod:`.device_map`), so ``torch.tensor(t)``'s "To copy construct from a tensor" or
  ``F.softmax``'s "Implicit dimension choice" (``stacklevel=3``, counted through our frame) were
  reported at ``device_map.py``, even for programs that never touch the device;
* torch's meta kernels, run on stand-ins to infer an op's output (:mod:`.meta`), warn from inside
  ``meta.py`` (or from torch's Python meta code that it calls);
* libremote's own warnings, reached by different call paths (directly, through
  ``nn.Module.__call__``, through ``Module._apply``), for which no fixed ``stacklevel`` is right.

On CUDA the first two are attributed to the frame that called the op, and a library's own warning
to the program's line. Python 3.12's ``warnings.warn(skip_file_prefixes=...)`` would do the third;
libremote supports 3.11, so:

* :func:`warn` (libremote's own warnings) computes the ``stacklevel`` of the first frame outside
  libremote and torch;
* :func:`_showwarnmsg` replaces ``warnings._showwarnmsg`` (:mod:`.patches`; the hook ``warnings``
  documents as "replace if you like", called for every warning that passed the filters): a warning
  attributed to a libremote frame, or to torch code that libremote called, is warned again at the
  first frame outside libremote, so filters, ``__warningregistry__`` (once per location) and
  ``catch_warnings(record=True)`` all see the program's line. It costs nothing per op: it runs
  only when a warning is shown. (Torch frames between the program and libremote stay as on CUDA:
  a warning for ``F.linear`` called by ``nn.Linear.forward`` points at ``linear.py``.)
"""

from __future__ import annotations

import os
import sys
import warnings
from types import FrameType

import torch

_LIBREMOTE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_TORCH = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_OVERRIDES = os.path.join(_TORCH, "overrides.py")  # handle_torch_function
_DEVICE_MODE = os.path.join(_LIBREMOTE, "client", "device_map.py")


def _in_libremote(frame: FrameType) -> bool:
    return frame.f_code.co_filename.startswith(_LIBREMOTE)


def _in_torch(frame: FrameType) -> bool:
    return frame.f_code.co_filename.startswith(_TORCH)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` for libremote's own warnings: at the first frame outside libremote and
    torch (the program's line that led here), whatever the call path."""
    frame: FrameType | None = sys._getframe(1)
    level = 2  # stacklevel 1 is this function, 2 its caller
    while frame is not None and frame.f_back is not None and (_in_libremote(frame) or _in_torch(frame)):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)


def _attributed_frame(message: warnings.WarningMessage, frame: FrameType | None) -> FrameType | None:
    """The frame, from ``frame`` outward, that ``message`` was attributed to."""
    while frame is not None and not (frame.f_code.co_filename == message.filename
                                     and frame.f_lineno == message.lineno):
        frame = frame.f_back
    return frame


def _program_frame(message: warnings.WarningMessage) -> FrameType | None:
    """Where a warning being shown belongs if it was attributed inside libremote (``None``: leave
    it where it is): the caller of the outermost libremote frame of the run of libremote and
    torch frames it was raised in."""
    frame = _attributed_frame(message, sys._getframe(2))  # (2: skip the hook's own frames)
    if frame is None:  # shown away from the warning's own stack (a replay): nothing to match
        return None
    if _in_torch(frame):
        caller = frame
        while caller is not None and _in_torch(caller):
            caller = caller.f_back
        if caller is None or not _in_libremote(caller) or caller.f_code.co_filename == _DEVICE_MODE:
            # Torch code the program called; or that the device mode passed the program's call
            # on to, which runs as it would on CUDA.
            return None
    elif not _in_libremote(frame):
        return None
    outermost = frame
    while frame is not None and (_in_libremote(frame) or _in_torch(frame)):
        if _in_libremote(frame):
            outermost = frame
        frame = frame.f_back
    target = outermost.f_back
    if target is not None and target.f_code.co_filename == _OVERRIDES and target.f_back is not None:
        # A torch function written in Python reached the device mode through
        # handle_torch_function: on CUDA the function runs in its caller's place.
        target = target.f_back.f_back
    return target


def _forget(message: warnings.WarningMessage, frame: FrameType | None) -> None:
    """Drop the 'already shown here' marks the first, misattributed, pass left in the registry of
    the module it was attributed to: else the same warning from another program line would be
    suppressed as a repeat."""
    frame = _attributed_frame(message, frame)
    if frame is None:
        return
    registry = frame.f_globals.get("__warningregistry__")
    if isinstance(registry, dict):
        text = str(message.message)
        registry.pop((text, message.category, message.lineno), None)
        registry.pop((text, message.category, 0), None)


_original_showwarnmsg = warnings._showwarnmsg  # type: ignore[attr-defined]
#: How many warnings were moved to the program's line so far. :func:`.meta.infer` compares it
#: before and after a meta kernel runs: a call that warned is not cached, so that it warns again
#: each time, as the op does on CUDA.
moved = 0


def _showwarnmsg(msg: warnings.WarningMessage) -> None:
    global moved
    target = _program_frame(msg)
    if target is None:
        _original_showwarnmsg(msg)
        return
    moved += 1
    _forget(msg, sys._getframe(1))
    module_globals = target.f_globals
    registry = module_globals.setdefault("__warningregistry__", {})
    warnings.warn_explicit(
        msg.message, msg.category, target.f_code.co_filename, target.f_lineno,
        module=module_globals.get("__name__", "<string>"), registry=registry, source=msg.source,
    )

