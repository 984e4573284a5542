"""The front's workers: one process per tenant, started from the zygote, watched, ended.

Which process runs a session (:meth:`WorkerPool.worker_for`): the worker of its tenant, when the
daemon knows who its tenants are (a tenants file, or CURVE keys); a tenant's sessions trust each
other, share its memory quota and the OS limits of one process, and share one CUDA context per
device. When the daemon has no identities (plain TCP without a tenants file, any client may call
itself anything), every session is its own tenant and gets a process of its own: two clients that
cannot be told apart must not share an address space. A worker serves all the daemon's devices
its sessions use, so that a session spanning several devices (``LIBREMOTE_DEVICES``) moves
tensors between them inside one process; a device context is created only where used.

Workers are forked from the zygote (server/worker/zygote.py, which has torch imported), so a new
one serves within tens of milliseconds. The pool watches them: a worker that exits (a crash, the
out-of-memory killer, the op time limit below) ends its sessions alone, and the front tells their
clients why; the next session of that tenant gets a fresh worker. A worker whose slice has run
longer than ``--op-time-limit`` (it writes when each slice starts into a word the front reads,
``Watchdog`` in server/worker/loop.py) is killed: a kernel that never returns cannot be stopped
from inside its process.
"""

from __future__ import annotations

import collections
import logging
import mmap
import os
import secrets
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from libremote_wire import codec
from libremote_wire.messages import Ctl

from . import os_limits
from .policy import Tenant
from .worker import zygote

log = logging.getLogger("libremote.server")

_WATCHDOG = struct.Struct("<d")
#: How long a worker with no session is kept for its tenant's next one (device contexts are slow
#: to make on a GPU); per-session workers stop at once.
TENANT_WORKER_LINGER_S = 30.0
#: A worker that does not say READY within this long after its fork is given up.
START_TIMEOUT_S = 60.0


@dataclass
class WorkerProcess:
    """One worker as the front sees it."""

    id: str
    key: str  # the tenant's name, or "session:ID" for a worker of one anonymous session
    tenant: Tenant
    priority: str
    watchdog_path: str
    pid: int | None = None
    endpoint: str | None = None
    state: str = "starting"  # starting -> ready -> stopping -> gone
    pending: list[bytes] = field(default_factory=list)  # control messages held until READY
    sessions: set[str] = field(default_factory=set)
    started: float = field(default_factory=time.monotonic)
    idle_since: float | None = None
    killed_for: str | None = None  # why the front killed it (op time limit)
    cgroup: str | None = None
    _watchdog: mmap.mmap | None = None

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def slice_started(self) -> float:
        """When the slice it runs now began (CLOCK_MONOTONIC), or 0 between slices."""
        if self._watchdog is None:
            return 0.0
        started: float = _WATCHDOG.unpack_from(self._watchdog, 0)[0]
        return started


class WorkerPool:
    """The zygote, the workers it forked, and the front's control socket to them."""

    def __init__(self, runtime_dir: Path, control: zmq.Socket[Any], base_config: dict[str, Any], *,
                 op_time_limit_s: float | None, memory_margin: int,
                 on_exit: Callable[[WorkerProcess, str], None]) -> None:
        self.runtime_dir = runtime_dir
        self._control = control
        self.base_config = base_config
        self.op_time_limit_s = op_time_limit_s
        self.memory_margin = memory_margin
        #: "cpu" when every device of the daemon is the CPU backend (then device memory is host
        #: memory, and a worker's memory cap includes its tenant's quota), else "accelerator".
        self.device_type = "accelerator"
        self._on_exit = on_exit
        self.workers: dict[str, WorkerProcess] = {}
        self._by_key: dict[str, WorkerProcess] = {}
        #: Workers that exited, a while: a stopping worker's last REPORT may come after its exit.
        self._gone: collections.OrderedDict[str, WorkerProcess] = collections.OrderedDict()
        self._cgroups = os_limits.Cgroups.detect()
        self._zygote: subprocess.Popen[bytes] | None = None
        self._zygote_out = -1
        self.crashes = 0
        self.hardware: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------------------
    # The zygote
    # ------------------------------------------------------------------------------------------
    def start(self, device_spec: str, log_level: str) -> tuple[list[str], list[dict[str, Any]], str]:
        """Start the zygote and probe ``--device``: (device specs, their facts, the workers'
        torch version). ValueError when the machine does not have what ``--device`` names."""
        env = dict(os.environ, LIBREMOTE_LOG_LEVEL=log_level)
        self._zygote = subprocess.Popen(
            [sys.executable, "-m", "libremote_server.worker.zygote"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env=env, close_fds=True)
        self._zygote_out = self._zygote.stdout.fileno()  # type: ignore[union-attr]
        self._to_zygote({"op": "probe", "devices": device_spec})
        answer = zygote.read_message(self._zygote_out)
        if answer is None:
            raise ValueError("the worker zygote died while starting (see the log above)")
        if answer.get("error"):
            raise ValueError(answer["error"])
        self.base_config["device_specs"] = answer["devices"]
        self.device_type = "cpu" if all(spec == "cpu" for spec in answer["devices"]) else "accelerator"
        self.hardware = answer.get("hardware") or [{} for _ in answer["devices"]]  # (GPU UUIDs, for NVML)
        return answer["devices"], answer["facts"], answer["torch"]

    @property
    def zygote_fd(self) -> int:
        return self._zygote_out

    def _to_zygote(self, message: dict[str, Any]) -> None:
        assert self._zygote is not None and self._zygote.stdin is not None
        zygote.write_message(self._zygote.stdin, message)

    def on_zygote(self) -> None:
        """Read one message from the zygote (its stdout is readable)."""
        message = zygote.read_message(self._zygote_out)
        if message is None:
            log.error("the worker zygote exited; no new worker can start (restart libremote-server)")
            self._zygote_out = -1
            return
        worker = self.workers.get(message.get("id", ""))
        if worker is None:
            return
        if message["op"] == "spawned":
            worker.pid = message["pid"]
        elif message["op"] == "exited":
            self._exited(worker, message["status"])

    def stop(self) -> None:
        for worker in list(self.workers.values()):
            if worker.pid is not None and worker.state != "gone":
                worker.state = "stopping"
                self.send(worker, [Ctl.STOP])
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and any(w.state != "gone" for w in self.workers.values() if w.pid):
            if self._zygote_out < 0 or not select.select([self._zygote_out], [], [], 0.1)[0]:
                continue
            self.on_zygote()
        if self._zygote is not None and self._zygote.stdin is not None:
            self._zygote.stdin.close()  # (the zygote kills what is left)
            try:
                self._zygote.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._zygote.kill()
        for worker in self.workers.values():
            self._forget_files(worker)

    # ------------------------------------------------------------------------------------------
    # Workers
    # ------------------------------------------------------------------------------------------
    def worker_for(self, key: str, tenant: Tenant, priority: str) -> WorkerProcess:
        """The live worker for ``key``, or a new one forked for it."""
        worker = self._by_key.get(key)
        if worker is not None and worker.state in ("starting", "ready"):
            worker.idle_since = None
            return worker
        return self._spawn(key, tenant, priority)

    def _spawn(self, key: str, tenant: Tenant, priority: str) -> WorkerProcess:
        worker_id = secrets.token_hex(8)  # (unguessable: the control socket accepts known ids only)
        watchdog_path = self.runtime_dir / f"watchdog-{worker_id}"
        watchdog_path.write_bytes(bytes(_WATCHDOG.size))
        worker = WorkerProcess(worker_id, key, tenant, priority, str(watchdog_path))
        with open(watchdog_path, "r+b") as file:
            worker._watchdog = mmap.mmap(file.fileno(), _WATCHDOG.size)
        memory = self._memory_cap(tenant)
        limits: dict[str, Any] = {"nice": os_limits.nice_for(tenant.priority if key == tenant.name else priority,
                                                             tenant.weight)}
        if memory is not None:
            worker.cgroup = self._cgroups.create(worker_id, memory + (1 << 30)) if self._cgroups else None
            limits["cgroup" if worker.cgroup else "memory"] = worker.cgroup or memory
        config = dict(self.base_config, worker_id=worker_id, tenant=tenant.name, watchdog=str(watchdog_path))
        self.workers[worker_id] = self._by_key[key] = worker
        self._to_zygote({"op": "spawn", "id": worker_id, "config": config, "limits": limits})
        log.info("worker %s started for %s", worker_id, key if key == tenant.name else f"{key} (tenant {tenant.name})")
        return worker

    def _memory_cap(self, tenant: Tenant) -> int | None:
        """Host memory a worker may take beyond what it holds when forked: on the CPU backend the
        tenant's quota (device memory is host memory there) plus room for its messages and
        bookkeeping; on a GPU that room only (device memory is capped by the allocator)."""
        if self.memory_margin <= 0:
            return None
        return self.memory_margin + (tenant.memory_quota if self.device_type == "cpu" else 0)

    def ready(self, worker: WorkerProcess, endpoint: str) -> None:
        worker.endpoint = endpoint
        worker.state = "ready"
        for data in worker.pending:
            self._control.send_multipart([worker.id.encode(), data])
        worker.pending.clear()

    def send(self, worker: WorkerProcess, header: list[Any]) -> None:
        data = codec.packb(header)
        if worker.state == "ready" or header[0] == Ctl.STOP:
            try:
                self._control.send_multipart([worker.id.encode(), data], flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # (gone: its exit is reported by the zygote)
        elif worker.state == "starting":
            worker.pending.append(data)

    def by_routing_id(self, routing_id: bytes) -> WorkerProcess | None:
        try:
            worker_id = routing_id.decode("ascii")
        except UnicodeDecodeError:
            return None
        return self.workers.get(worker_id) or self._gone.get(worker_id)

    def housekeeping(self, now: float) -> None:
        """Kill runaway workers (--op-time-limit), give up on ones that never started, stop idle
        ones."""
        for worker in list(self.workers.values()):
            if worker.state == "gone":
                continue
            if self.op_time_limit_s is not None and worker.pid is not None:
                started = worker.slice_started()
                if started and now - started > self.op_time_limit_s and worker.killed_for is None:
                    worker.killed_for = (f"an op ran longer than the daemon's limit of {self.op_time_limit_s:g} s "
                                         "(--op-time-limit), so the worker running it was ended")
                    log.warning("worker %s (%s): %s", worker.id, worker.key, worker.killed_for)
                    self._kill(worker)
            if worker.state == "starting" and now - worker.started > START_TIMEOUT_S and worker.killed_for is None:
                worker.killed_for = f"the worker did not start within {START_TIMEOUT_S:g} s"
                self._kill(worker)
            if worker.state == "ready" and not worker.sessions:
                linger = 0.0 if worker.key != worker.tenant.name else TENANT_WORKER_LINGER_S
                if worker.idle_since is None:
                    worker.idle_since = now
                if now - worker.idle_since >= linger:
                    self.retire(worker)

    def retire(self, worker: WorkerProcess) -> None:
        """Stop a worker that has no session left (it exits; the zygote reports it)."""
        worker.state = "stopping"
        if self._by_key.get(worker.key) is worker:
            del self._by_key[worker.key]
        self.send(worker, [Ctl.STOP])

    def _kill(self, worker: WorkerProcess) -> None:
        if worker.pid is not None:
            try:
                os.kill(worker.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _exited(self, worker: WorkerProcess, status: int) -> None:
        stopping = worker.state == "stopping"
        worker.state = "gone"
        self.workers.pop(worker.id, None)
        self._gone[worker.id] = worker
        while len(self._gone) > 256:
            self._gone.popitem(last=False)
        if self._by_key.get(worker.key) is worker:
            del self._by_key[worker.key]
        self._forget_files(worker)
        if stopping and status == 0:
            log.info("worker %s (%s) stopped", worker.id, worker.key)
            return
        why = worker.killed_for or _describe_exit(status)
        self.crashes += 1
        log.error("worker %s (pid %s, %s) ended: %s", worker.id, worker.pid, worker.key, why)
        self._on_exit(worker, why)

    def _forget_files(self, worker: WorkerProcess) -> None:
        if worker._watchdog is not None:
            worker._watchdog.close()
            worker._watchdog = None
        try:
            os.unlink(worker.watchdog_path)
        except OSError:
            pass
        if worker.cgroup and self._cgroups is not None:
            self._cgroups.remove(worker.cgroup)


def _describe_exit(status: int) -> str:
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        if -status == signal.SIGKILL:
            return ("the worker running this tenant's kernels was killed (SIGKILL: the operating system's "
                    "out-of-memory killer, or an operator)")
        return f"the worker running this tenant's kernels crashed ({name})"
    return f"the worker running this tenant's kernels exited unexpectedly (status {status})"
