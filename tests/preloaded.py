"""Client programs in processes forked from an interpreter that has already imported torch.

Why: the suite is CPU-bound on two cores, and most of its CPU went to client interpreters
starting: ``import torch`` (~1.4 s), torch importing ``torch.distributed.tensor`` (and sympy) at
the first ``__torch_dispatch__`` of a tensor subclass (~0.6 s: torch's C++ looks up the DTensor
class there), and tearing down (~0.3 s) — some 2.3 s of the ~2.6 s a small client took, for ~220
clients. A client forked from a *preloaded* interpreter pays none of it, and is still its own
process: its own ZeroMQ connection to a real daemon, its own pid, killable, with its own exit
status and output.

What a forked client sees is what a fresh ``python PROGRAM`` would see, as far as the programs
can tell: ``sys.argv``, ``sys.path[0]``, ``__main__``, the working directory, the environment,
stdin/stdout/stderr, default signal handlers, fresh random seeds. libremote is not imported in the
preloaded interpreter; ``torch`` is taken out of ``sys.modules`` before the program runs and
comes back, the same module object, at the program's first ``import torch`` — which is where the
``LIBREMOTE_SERVER`` start-up hook (shims/_libremote_autostart.py) activates libremote in a real
interpreter, so the child does the same then.

What it cannot reproduce, so :func:`needs_fresh_interpreter` sends those to a real exec:
environment variables that torch or its libraries read while being imported (``OMP_*``,
``TORCH_*``, ...), and programs that look at what is imported (tests pass ``fresh=True``).

The launcher is one ``python tests/preloaded.py SOCKET`` per pytest process: it receives a
request (argv, working directory, environment) with the child's stdin, stdout, stderr and a
status pipe (SCM_RIGHTS over a Unix socket), forks, and writes the child's wait status into the
status pipe when it exits. :class:`PreloadedPopen` is ``subprocess.Popen`` with its fork/exec
(``_execute_child``) and waits (``_try_wait``) replaced by that exchange, so ``poll``, ``wait``,
``communicate``, ``kill`` and timeouts behave as for any Popen. (Both are private methods of
CPython's subprocess; tests/test_preloaded.py checks the behaviour the suite relies on.)
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from typing import Any

#: Extra environment variables whose names start so are read while torch (or libgomp, MKL, CUDA,
#: ZeroMQ, Python itself) loads: a preloaded interpreter has already read them.
IMPORT_TIME_PREFIXES = ("OMP_", "KMP_", "MKL_", "GOMP_", "TORCH", "PYTORCH", "CUDA", "NVIDIA", "LD_", "PYTHON", "ZMQ")

_STATUS = struct.Struct("i")


def needs_fresh_interpreter(base_env: dict[str, str], env: dict[str, str]) -> bool:
    """Whether ``env`` sets, drops or changes a variable read at import time, against the
    environment the launcher was started with."""
    changed = {key for key in env.keys() | base_env.keys() if env.get(key) != base_env.get(key)}
    return any(key.startswith(IMPORT_TIME_PREFIXES) for key in changed)


# ---------------------------------------------------------------- the launcher (its own process)


def _serve(path: str) -> dict[str, Any]:
    """Accept requests until one is to be run; returns it only in the forked child."""
    import numpy  # noqa: F401  (what the client programs import; loaded once, here)
    import torch
    import torch.distributed.tensor  # noqa: F401  (see the module docstring: the first dispatch imports it)
    import zmq  # noqa: F401

    del torch
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # (the wake-up fd is what matters)
    print("ready", flush=True)
    status_pipes: dict[int, int] = {}
    while True:
        readable, _, _ = select.select([listener, wake_read], [], [])
        if wake_read in readable:
            os.read(wake_read, 4096)
            _reap(status_pipes)
        if listener not in readable:
            continue
        connection, _ = listener.accept()
        with connection:
            message, fds, _, _ = socket.recv_fds(connection, 1 << 20, 4)
            if not message:  # the test process asks the launcher to end
                return {}
            request = json.loads(message)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                listener.close()
                for fd in (wake_read, wake_write, *status_pipes.values(), fds[3]):
                    os.close(fd)
                for target, fd in enumerate(fds[:3]):
                    os.dup2(fd, target)
                    os.close(fd)
                return request
            for fd in fds[:3]:
                os.close(fd)
            status_pipes[pid] = fds[3]
            connection.sendall(_STATUS.pack(pid))
        _reap(status_pipes)


def _reap(status_pipes: dict[int, int]) -> None:
    while status_pipes:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        fd = status_pipes.pop(pid, None)
        if fd is not None:
            try:
                os.write(fd, _STATUS.pack(status))
            except OSError:
                pass
            os.close(fd)


class _TorchAgain:
    """A meta-path finder that gives the preloaded torch back at the program's first ``import
    torch``, activating libremote there when ``LIBREMOTE_SERVER`` is set (as the start-up hook
    does in a fresh interpreter)."""

    def __init__(self, torch: Any) -> None:
        self.torch = torch

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "torch":
            return None
        import importlib.util

        sys.meta_path.remove(self)
        return importlib.util.spec_from_loader("torch", self)

    def create_module(self, spec: Any) -> Any:
        self.spec = self.torch.__spec__
        return self.torch

    def exec_module(self, module: Any) -> None:
        module.__spec__ = self.spec
        if os.environ.get("LIBREMOTE_SERVER"):
            import libremote  # noqa: F401


def _run(request: dict[str, Any]) -> None:
    """In the forked child: become ``python ARGV`` (``-c CODE`` or a script) and run it."""
    import random
    import runpy
    import types

    import numpy

    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for name in ("SIGINT", "SIGTERM", "SIGPIPE", "SIGHUP"):
        signal.signal(getattr(signal, name), signal.default_int_handler if name == "SIGINT" else signal.SIG_DFL)
    random.seed()
    numpy.random.seed()
    sys.meta_path.insert(0, _TorchAgain(sys.modules.pop("torch")))
    argv = request["argv"]
    if argv[0] == "-c":
        sys.argv = ["-c", *argv[2:]]
        sys.path[0] = ""
        main = types.ModuleType("__main__")
        sys.modules["__main__"] = main
        exec(compile(argv[1], "<string>", "exec"), main.__dict__)
    else:
        sys.argv = list(argv)
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
        runpy.run_path(argv[0], run_name="__main__")


# ---------------------------------------------------------------- the test process's side


class _Launcher:
    """The launcher process of this test process (started on first use)."""

    def __init__(self, env: dict[str, str], cwd: str) -> None:
        self.env = env
        self.folder = tempfile.mkdtemp(prefix="libremote-preloaded-")
        self.path = os.path.join(self.folder, "launcher")
        self.process = subprocess.Popen([sys.executable, __file__, self.path], env=env, cwd=cwd,
                                        stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"the preloaded launcher did not start (exit {self.process.poll()})")

    def launch(self, argv: list[str], cwd: str, env: dict[str, str], stdio: list[int], status_fd: int) -> int:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.connect(self.path)
            request = json.dumps({"argv": argv, "cwd": cwd, "env": env}).encode()
            socket.send_fds(connection, [request], [*stdio, status_fd])
            reply = connection.recv(_STATUS.size, socket.MSG_WAITALL)
        if len(reply) != _STATUS.size:
            raise RuntimeError("the preloaded launcher did not answer")
        return _STATUS.unpack(reply)[0]

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
                    connection.connect(self.path)
                    socket.send_fds(connection, [b""], [])
                self.process.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        try:
            os.unlink(self.path)
            os.rmdir(self.folder)
        except OSError:
            pass


_launcher: _Launcher | None = None
_launcher_lock = threading.Lock()


def launcher(env: dict[str, str], cwd: str) -> _Launcher:
    global _launcher
    with _launcher_lock:
        if _launcher is None or _launcher.process.poll() is not None:
            _launcher = _Launcher(env, cwd)
            atexit.register(_launcher.close)
        return _launcher


class PreloadedPopen(subprocess.Popen):
    """``subprocess.Popen(["python", ...])`` whose process is forked by the preloaded launcher
    (``launcher`` started with ``base_env``). Only ``python -c CODE ...`` and ``python SCRIPT
    ...`` argv; stdin, stdout and stderr as for Popen."""

    def __init__(self, args: list[str], *, base_env: dict[str, str], **kwargs: Any) -> None:
        self._base_env = base_env
        self._status_fd = -1
        super().__init__(args, **kwargs)

    def _execute_child(self, args: Any, executable: Any, preexec_fn: Any, close_fds: Any, pass_fds: Any, cwd: Any,
                       env: Any, startupinfo: Any, creationflags: Any, shell: Any, p2cread: int, p2cwrite: int,
                       c2pread: int, c2pwrite: int, errread: int, errwrite: int, *unused: Any) -> None:
        null = os.open(os.devnull, os.O_RDONLY)
        stdio = [null if p2cread == -1 else p2cread,  # (-1: inherited; the test's own stdin is nothing to read)
                 1 if c2pwrite == -1 else c2pwrite, 2 if errwrite == -1 else errwrite]
        status_read, status_write = os.pipe()
        where = str(cwd or os.getcwd())
        try:
            self.pid = launcher(self._base_env, where).launch(
                list(args[1:]), where, dict(env if env is not None else os.environ), stdio, status_write)
            self._status_fd = status_read
        except BaseException:
            os.close(status_read)
            raise
        finally:
            # The child's ends of its pipes, as Popen's own _execute_child closes them.
            for fd in {null, status_write, p2cread, c2pwrite, errwrite} - {-1, 0, 1, 2}:
                os.close(fd)
            self._closed_child_pipe_fds = True
        self._child_created = True

    def _try_wait(self, wait_flags: int) -> tuple[int, int]:
        if wait_flags & os.WNOHANG:
            ready, _, _ = select.select([self._status_fd], [], [], 0)
            if not ready:
                return (0, 0)
        data = b""
        while len(data) < _STATUS.size:
            try:
                chunk = os.read(self._status_fd, _STATUS.size - len(data))
            except InterruptedError:
                continue
            if not chunk:  # the launcher died: the child's status is lost
                return (self.pid, 255 << 8)
            data += chunk
        os.close(self._status_fd)
        self._status_fd = -1
        return (self.pid, _STATUS.unpack(data)[0])

    def _internal_poll(self, _deadstate: Any = None, **_: Any) -> int | None:
        if self.returncode is None and self._status_fd >= 0:
            if not self._waitpid_lock.acquire(False):
                return None
            try:
                if self.returncode is None:
                    pid, status = self._try_wait(os.WNOHANG)
                    if pid == self.pid:
                        self._handle_exitstatus(status)
            finally:
                self._waitpid_lock.release()
        return self.returncode


if __name__ == "__main__":
    _request = _serve(sys.argv[1])
    if not _request:  # (the launcher itself, asked to end)
        sys.exit(0)
    _run(_request)
