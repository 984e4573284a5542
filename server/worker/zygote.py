"""The zygote: a process that has imported torch once, and forks a worker per request.

A worker must start in milliseconds (a client waits for its session while it does), and a fresh
interpreter takes seconds to import torch. So the front starts this process once; it imports torch
and the worker's modules, touches no device and starts no thread, and then forks: a child is a
worker with everything imported, ready in tens of milliseconds. (Forking after a device or a
thread pool was initialised is unsafe, so nothing here initialises either; each worker does, after
the fork, for itself.) The front reads device facts from a *probe* child, which may initialise the
devices because it exits right after.

The zygote speaks to the front over its stdin and stdout: 4-byte little-endian lengths, each
followed by a MessagePack map (``op`` says what it is). The front sends ``probe`` and ``spawn``;
the zygote answers ``probed`` and ``spawned``, and reports ``exited`` (with the exit status the
way ``subprocess`` gives it: negative for a signal) for every child it reaps. When the front goes
away (its end of the pipe closes, or it dies: the kernel signals the zygote, see
``_die_with_parent``), the zygote kills its workers and exits; a worker whose zygote dies is killed
by the kernel too, so no worker outlives its daemon.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import select
import signal
import struct
import sys
import traceback
from typing import IO, Any

import msgpack

_LENGTH = struct.Struct("<I")
_PR_SET_PDEATHSIG = 1


def write_message(stream: IO[bytes], message: dict[str, Any]) -> None:
    data = msgpack.packb(message, use_bin_type=True)
    stream.write(_LENGTH.pack(len(data)) + data)
    stream.flush()


def read_message(fd: int) -> dict[str, Any] | None:
    """One message from ``fd`` (blocking), or None at end of file."""
    head = _read_exactly(fd, _LENGTH.size)
    if head is None:
        return None
    body = _read_exactly(fd, _LENGTH.unpack(head)[0])
    return None if body is None else msgpack.unpackb(body, raw=False)


def _read_exactly(fd: int, count: int) -> bytes | None:
    chunks = []
    while count:
        chunk = os.read(fd, count)
        if not chunk:
            return None
        chunks.append(chunk)
        count -= len(chunk)
    return b"".join(chunks)


def _die_with_parent(sig: int) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent exits (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):
        pass


class Zygote:
    def __init__(self) -> None:
        self.children: dict[int, str] = {}  # pid -> worker id
        self.out = sys.stdout.buffer
        self.request_fd = sys.stdin.fileno()

    def serve(self) -> None:
        try:
            while True:
                self._reap()
                ready, _, _ = select.select([self.request_fd], [], [], 0.1)
                if not ready:
                    continue
                request = read_message(self.request_fd)
                if request is None:
                    return  # the front is gone
                if request.get("op") == "probe":
                    write_message(self.out, self._probe(request["devices"]))
                elif request.get("op") == "spawn":
                    pid = self._spawn(request)
                    write_message(self.out, {"op": "spawned", "id": request["id"], "pid": pid})
        finally:
            for pid in list(self.children):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker_id = self.children.pop(pid, None)
            if worker_id is not None:
                write_message(self.out, {"op": "exited", "id": worker_id, "pid": pid,
                                         "status": os.waitstatus_to_exitcode(status)})

    def _probe(self, spec: str) -> dict[str, Any]:
        """Resolve ``--device`` and read the devices' facts in a child (which may initialise the
        devices: it exits), so that this process never does."""
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            try:
                from . import devices

                found = devices.resolve_devices(spec)
                import torch

                answer = {"op": "probed", "devices": [str(d) for d in found],
                          "facts": [devices.describe(d).to_wire() for d in found], "torch": torch.__version__,
                          "hardware": [devices.hardware_id(d) for d in found]}
            except Exception as exc:  # ValueError: a --device the machine does not have
                answer = {"op": "probed", "error": str(exc)}
            with os.fdopen(write_end, "wb") as stream:
                write_message(stream, answer)
            os._exit(0)
        os.close(write_end)
        answer = read_message(read_end) or {"op": "probed", "error": "the device probe died"}
        os.close(read_end)
        os.waitpid(pid, 0)
        return answer

    def _spawn(self, request: dict[str, Any]) -> int:
        pid = os.fork()
        if pid:
            self.children[pid] = request["id"]
            return pid
        code = 1
        try:
            _become_worker(request)
            code = 0
        except BaseException:  # (SystemExit included: a worker never returns into the zygote)
            traceback.print_exc()
        finally:
            logging.shutdown()
            os._exit(code)


def _become_worker(request: dict[str, Any]) -> None:
    """In the forked child: cut the zygote's pipes, take the limits the front set, serve."""
    _die_with_parent(signal.SIGKILL)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(2, 1)  # (stdout is the zygote's pipe to the front: never write there)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the front, which stops workers
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    from .. import os_limits
    from .loop import Worker, WorkerConfig

    os_limits.apply_in_child(request.get("limits") or {})
    config = WorkerConfig.from_wire(request["config"])
    Worker(config).serve_forever()


def main() -> None:
    _die_with_parent(signal.SIGTERM)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from ..telemetry import logs

    # (--log-level and --log-format reach the zygote, and so every worker, from the front.)
    logs.configure(os.environ.get("LIBREMOTE_LOG_LEVEL", "INFO"), os.environ.get("LIBREMOTE_LOG_FORMAT", "text"),
                   "worker")
    # Import what every worker needs before forking, so a child starts with it loaded.
    import torch  # noqa: F401

    from . import loop  # noqa: F401

    # Everything imported so far (torch's ~170,000 objects) lives as long as the process: moved
    # out of the collector's sight, a worker's collections walk only what the worker itself made,
    # and never write to the pages it shares with the zygote. The daemon's CPU per streamed op
    # fell from 30.3 to 26.7 us with it (benchmarks/daemon_cpu.py, 2-core VM): full collections,
    # triggered by the handles a session keeps, had walked torch's objects over and over.
    gc.collect()
    gc.freeze()
    Zygote().serve()


if __name__ == "__main__":
    main()
