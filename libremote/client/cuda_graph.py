"""``torch.cuda.CUDAGraph``, ``torch.cuda.graph`` and ``graph_pool_handle`` for remote devices.

Layer 4, the torch-facing facade, over :mod:`.capture`.

A captured region is recorded without running into a daemon-side program, the same kind that
:func:`libremote.capture_step` makes (server/programs.py), and ``replay()`` sends one REPLAY. The
daemon allocates the region's results that the client still holds when the capture ends, as a
CUDA graph's outputs exist from its capture on; ``torch.cuda.make_graphed_callables`` builds on
exactly that. Installed in ``torch.cuda`` by :mod:`.cuda_api`.
"""

from __future__ import annotations

from typing import Any

from libremote_wire import torch_codec
from libremote_wire.messages import Cmd

from ..errors import CaptureError
from . import capture, runtime


class CUDAGraph:
    """``torch.cuda.CUDAGraph`` for remote devices: what ``torch.cuda.graph`` captures becomes a
    daemon-side program, and :meth:`replay` is one REPLAY command (launched as a real CUDA graph
    by a GPU daemon once warm, like a captured step's).

    As with CUDA, capturing runs nothing: the ops are recorded, not executed, so an optimizer
    step in the captured region updates nothing until the first replay, and the region's outputs
    exist from the capture on but hold their values only after a replay (until then they are
    uninitialised memory, as CUDA's), and the graph holds their memory until it is reset or
    collected (another graph may read them: ``make_graphed_callables``' backward reads what its
    forward left). The region must not wait for the device or send new host data (the contract
    of :func:`~.capture.capture_step`). ``pool`` arguments are accepted and have no effect."""

    def __init__(self, keep_graph: bool = False) -> None:
        self.id: int | None = None
        self._capture_id = 0
        self._session: Any = None
        self._recording: list[Any] | None = None

    def capture_begin(self, pool: Any = None, capture_error_mode: str = "global", **kwargs: Any) -> None:
        session = runtime.current()
        self._capture_id = capture.begin_capture()
        self._session, self._recording = session, []
        session.start_recording(self._recording, run=False)

    def capture_end(self) -> None:
        if self._recording is None:
            raise CaptureError("libremote: capture_end() without capture_begin()")
        recording, self._recording = self._recording, None
        try:
            made = self._session.stop_recording()
        finally:
            capture.end_capture()
        self.id = self._capture_id
        # The results still held exist from now on, uninitialised until the first replay (as
        # CUDA's): the daemon allocates them with these layouts.
        placeholders = [[tensor._ref.id, torch_codec.dtype_ext(tensor.dtype), list(tensor.shape), list(tensor.stride()),
                         tensor.storage_offset(), self._session.local_device(tensor._device_index)]
                        for tensor in made if tensor._ref.session is self._session]
        self._session.submit([Cmd.PROGRAM, self.id, recording, {"ran": False, "placeholders": placeholders}])
        self._session.synchronize()  # the daemon checked the recording: errors surface here

    def _abort(self) -> None:
        """The captured region raised: nothing recorded is kept."""
        if self._recording is not None:
            self._recording = None
            self._session.stop_recording(discard=True)
            capture.end_capture()

    def replay(self) -> None:
        if self.id is None:
            raise CaptureError("libremote: replay() of a CUDA graph that was never captured")
        if self._session.closed:
            raise CaptureError("libremote: the session this graph was captured in is closed; capture it again")
        if self._session.op_log is not None:
            self._session.op_log.append("libremote::replay(cuda graph)")
        self._session.submit([Cmd.REPLAY, self.id])

    def reset(self) -> None:
        """Forget the captured step; the daemon lets go of the memory its results held."""
        if self.id is not None:
            self._session.release_program(self.id)
        self.id = None

    def __del__(self) -> None:
        try:
            self.reset()
        except Exception:  # interpreter shutdown, a lost connection: nothing left to release
            pass

    def instantiate(self) -> None:
        pass

    def pool(self) -> tuple[str, int]:
        return ("libremote graph pool", id(self))

    def enable_debug_mode(self) -> None:
        pass

    def debug_dump(self, debug_path: str) -> None:
        raise CaptureError("libremote: a remote CUDA graph has no local dump; see libremote.op_trace()")


class graph:
    """``torch.cuda.graph(g)``: capture the ``with`` block into ``g`` (see :class:`CUDAGraph`)."""

    def __init__(self, cuda_graph: CUDAGraph, pool: Any = None, stream: Any = None,
                 capture_error_mode: str = "global", **kwargs: Any) -> None:
        if not isinstance(cuda_graph, CUDAGraph):
            raise TypeError(f"torch.cuda.graph expects a torch.cuda.CUDAGraph, got {type(cuda_graph).__name__}")
        self.cuda_graph = cuda_graph

    def __enter__(self) -> None:
        runtime.current().synchronize()  # as torch's: capture starts with the device idle
        self.cuda_graph.capture_begin()

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> None:
        if kind is not None:
            self.cuda_graph._abort()
            return None
        self.cuda_graph.capture_end()
        return None


def graph_pool_handle() -> tuple[str, int]:
    """``torch.cuda.graph_pool_handle()``: a token; memory pools are the daemon's business."""
    return ("libremote graph pool", 0)
