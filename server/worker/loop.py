"""A worker: the process that runs one tenant's sessions, and nobody else's.

The front (``libremote_server.front``) admits a client and hands its session to the worker of the
client's tenant with an OPEN control message; the client then talks to this process directly:
its BATCHes, PINGs and BYE arrive on this worker's own ROUTER socket, from the routing id (and,
under CURVE, the key) the front named. Nothing another tenant sends ever reaches this process, and
nothing this process does can reach another tenant's memory: the operating system's (and the
GPU's) per-process address spaces stand between them. A kernel that crashes here ends this
tenant's sessions only; the front tells their clients and starts a fresh worker for the next.

One thread owns both sockets (the clients' and the control socket to the front) and every session.
Each turn of the loop it takes in what has arrived, does its housekeeping (sessions whose clients
went silent, idle or disconnected), and then, per device, runs one slice of work for the session
the scheduler picks among this tenant's sessions. Ops launch asynchronously on accelerators; the
loop waits on a device only where a client asked for data back.

Why this module is over 500 lines: it holds one loop and the handlers of the worker's two
sockets; each handler is short, and what they call lives in session.py (running a batch),
slots.py (the scheduler's slices) and leases.py (memory the front grants).
"""

from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import zmq

from libremote_wire import codec, messages, torch_codec
from libremote_wire.codec import ProtocolError
from libremote_wire.messages import CONTROL, Ctl, ErrorKind, Msg
from libremote_wire.zmq_events import readable

from .. import auth, limits, outbox, peers, policy
from . import devices, host_memory, leases, op_policy, peer_pull
from .exports import Exports
from .residency import DeviceMemory
from .session import Reply, Session
from .session_quota import TenantAccount
from .slots import DeviceSlot, SliceTimer, Watchdog
from .stripes import StripeTable

log = logging.getLogger("libremote.server.worker")

#: A slice runs at most this many commands, or this long, before the scheduler may pick another
#: session (time matters on the CPU backend, where a command is its compute; on a GPU launches
#: are asynchronous and the command count bounds the slice).
SLICE_COMMANDS = 64
SLICE_SECONDS = 0.002
_HOUSEKEEPING_S = 0.5
_IDLE_TRIM_S = 2.0  # no batch for this long: the worker gives kept host memory back
#: Replies with this many bytes of frames or more are tracked until ZeroMQ has sent them: a
#: session whose client leaves them unread stops running (limits.MAX_UNSENT_REPLY_BYTES).
_TRACKED_REPLY_BYTES = 1 << 20
#: What a client sends its worker (HELLO, STATUS and ADMIN go to the front).
_CLIENT_MESSAGES = frozenset({Msg.BATCH, Msg.PING, Msg.BYE, Msg.PULL, Msg.STRIPE, Msg.CHUNK})
#: ZeroMQ I/O threads under CURVE: each connection is encrypted by one, so a session's stripes
#: (stripes.py) move bulk data on as many cores as there are threads (at most this many).
_CURVE_IO_THREADS = 1 + messages.MAX_STRIPES


@dataclass
class WorkerConfig:
    """What the front tells a worker it starts (``worker.zygote`` passes it in, decoded)."""

    worker_id: str
    tenant: str
    control: str  # the front's control socket (ipc://, private to the daemon's user)
    bind_host: str  # where clients connect: the front's host (tcp://HOST), or an ipc:// folder
    device_specs: list[str]  # the daemon's devices, by index ("cuda:0", "cpu", ...)
    heartbeat_s: float = 2.0
    heartbeat_timeout_s: float = 10.0
    idle_timeout_s: float | None = None
    spin_us: int = 300
    max_message_bytes: int = limits.MAX_MESSAGE_BYTES
    max_handles: int = limits.MAX_HANDLES
    cuda_graphs: str = "auto"
    graph_compiler: str = "none"
    residency: bool = False  # device memory is leased from the front's broker (oversubscription)
    op_rules: bool = True  # False only for tests that prove the process boundary without them
    auth_keys: str | None = None  # CURVE: the daemon's key folder; only this tenant's keys are accepted
    server_key: str | None = None
    watchdog: str | None = None  # the file the front reads to end a runaway slice (--op-time-limit)
    port_range: tuple[int, int] | None = None  # --worker-ports

    @classmethod
    def from_wire(cls, fields: dict[str, Any]) -> WorkerConfig:
        known = {name: value for name, value in fields.items() if name in cls.__dataclass_fields__}
        if known.get("port_range") is not None:
            known["port_range"] = tuple(known["port_range"])
        return cls(**known)


class Worker:
    """Serve the sessions the front hands over, for one tenant."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        op_policy.enforce_rules(config.op_rules)
        self.slots = [DeviceSlot(index, devices.resolve_device(spec)) for index, spec in enumerate(config.device_specs)]
        self.sessions: dict[bytes, Session] = {}  # by the client's routing id
        #: Per tenant, the quota its sessions here share (one tenant per worker, but for tests).
        self._accounts: dict[str, TenantAccount] = {}
        self.spin_s = config.spin_us / 1e6
        self._gone: collections.OrderedDict[bytes, str] = collections.OrderedDict()
        self._next_housekeeping = 0.0
        self._host_memory_kept = host_memory.keep_freed_memory()
        self._last_batch = time.monotonic()
        self._host_memory_trimmed = True
        self._stopping = False
        #: Messages refused by the worker (malformed, over a bound, another key's session), for
        #: the daemon's metrics; counted where they are refused, never per op.
        self.rejected: dict[str, int] = {}
        self.watchdog = Watchdog(config.watchdog)
        io_threads = min(_CURVE_IO_THREADS, os.cpu_count() or 1) if config.auth_keys is not None else 1
        self._context = zmq.Context(io_threads=max(1, io_threads))
        self.stripes = StripeTable()
        self._control = self._context.socket(zmq.DEALER)
        self._control.setsockopt(zmq.LINGER, 1000)  # (ENDED messages still go out when stopping)
        self._control.setsockopt(zmq.ROUTING_ID, config.worker_id.encode())
        self._control.connect(config.control)
        self.leases = leases.LeaseClient(self._control, self._on_control) if config.residency else None
        if config.residency:
            for slot in self.slots:
                slot.memory = DeviceMemory(slot.device, 0, 0)
                slot.memory.lease = self.leases.for_device(slot.index, slot.memory)  # type: ignore[union-attr]
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, config.max_message_bytes)
        outbox.configure(self._socket)
        self._outbox = outbox.Outbox(self._socket, self._on_outbox_full)
        self._socket.setsockopt(zmq.HEARTBEAT_IVL, int(config.heartbeat_s * 1000))
        self._socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(config.heartbeat_s * 3000))
        limits.bound_connections(self._socket)
        # A client that goes away (killed, closed) is seen at once: its session is reclaimed
        # without waiting for heartbeats (which still catch a host that vanished).
        self._peers = peers.Peers(self._socket, per_address=limits.CONNECTIONS_PER_ADDRESS)
        #: Cross-server copies (exports.py): what this worker's sessions offer to peer workers, and
        #: messages that arrived while a PULL of this worker waited on a peer (taken in next).
        self.exports = Exports(curve=config.auth_keys is not None)
        self._authenticator = None
        if config.auth_keys is not None:
            keyring = auth.KeyRing(config.auth_keys, config.server_key).only_tenant(config.tenant)
            self._authenticator = auth.secure(self._socket, keyring, export_keys=self.exports.keys)
            self.exports.server_public = keyring.server_public
        self.address = self._bind(config)
        self._stashed: collections.deque[list[zmq.Frame]] = collections.deque()
        torch.set_grad_enabled(False)

    def _bind(self, config: WorkerConfig) -> str:
        host = config.bind_host
        if host.startswith("ipc://"):
            address = f"{host.rstrip('/')}/worker-{config.worker_id}"
            self._socket.bind(address)
            return address
        if config.port_range is not None:
            low, high = config.port_range
            port = self._socket.bind_to_random_port(host, min_port=low, max_port=high + 1, max_tries=4 * (high - low + 1))
        else:
            port = self._socket.bind_to_random_port(host)
        return f"{host}:{port}"

    # ------------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------------
    def serve_forever(self) -> None:
        self._send_control([Ctl.READY, self.address, os.getpid()])
        log.info("worker %s (tenant %s, pid %d) serving on %s", self.config.worker_id, self.config.tenant,
                 os.getpid(), self.address)
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._control, zmq.POLLIN)
        poller.register(self._peers.monitor, zmq.POLLIN)
        last_message = 0.0
        try:
            while not self._stopping:
                if self._take_messages():
                    last_message = time.perf_counter()
                elif not any(session.has_work() for session in self.sessions.values()):
                    if time.perf_counter() - last_message < self.spin_s:
                        os.sched_yield()  # see --spin-us: poll again without sleeping
                    elif poller.poll(50):
                        self._take_messages()
                        last_message = time.perf_counter()
                for identity in self._peers.closed():
                    self.stripes.forget_stripe(identity)
                    if identity in self.sessions:
                        self._end_session(identity, "its client disconnected (exited, was killed, or closed the connection)")
                self._housekeeping()
                self._run_slices()
        finally:
            for identity in list(self.sessions):
                self._tell(identity, "the daemon is stopping: its session was closed")
                self._end_session(identity, "daemon stopping")
            self._send_control([Ctl.REPORT, 0, self.report()])  # (its totals, for the daemon's status)
            self._peers.close(self._socket)
            self._socket.close(500)  # (what was said to clients, "session closed: why", still goes out)
            if self._authenticator is not None:
                self._authenticator.stop()
            self._control.close()
            self._context.term()

    def _take_messages(self, limit: int = 256) -> int:
        """Handle the messages waiting (at most ``limit``) without blocking; return how many."""
        taken = 0
        while self.leases is not None and self.leases.deferred:  # (arrived while waiting for a lease)
            self._on_control(self.leases.deferred.popleft())
            taken += 1
        while readable(self._control) and taken < limit:
            self._on_control(self._control.recv_multipart(zmq.NOBLOCK))
            taken += 1
        while self._stashed and taken < limit:
            self._on_message(self._stashed.popleft())
            taken += 1
        while readable(self._socket) and taken < limit:
            self._on_message(self._socket.recv_multipart(zmq.NOBLOCK, copy=False))
            taken += 1
        return taken

    # ------------------------------------------------------------------------------------------
    # Cross-server copies (exports.py, peer_pull.py)
    # ------------------------------------------------------------------------------------------
    def _pull_from_peer(self, address: str, token: bytes, nbytes: int, into: memoryview,
                        curve: tuple[bytes, ...] | None = None) -> int:
        """A session's PULL: the bytes of a peer worker's export, while answering PULLs to this
        worker meanwhile (messages of other kinds wait in ``_stashed``: a session must not change
        while one of its commands runs)."""
        return peer_pull.pull(self._context, address, token, nbytes, into, serve_own=self._serve_pulls_only,
                              curve=curve)

    def _serve_pulls_only(self) -> None:
        while readable(self._socket) and len(self._stashed) < 4096:
            frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
            if len(frames) == 2 and _is_pull(frames[1]):
                self._on_message(frames)
            else:
                self._stashed.append(frames)

    def _on_pull(self, identity: bytes, token: bytes, offset: int, length: int, user_id: str | None) -> None:
        """A peer worker asks for a piece of an export: it gets it only with a live token (and,
        under CURVE, on a connection made with that export's own key)."""
        key = auth.export_key_of(user_id) if self._authenticator is not None else None
        total, piece, error = self.exports.serve(token, offset, length, key)
        if error is not None:
            self._count_rejected("pull")
            log.warning("refused a PULL from %s: %s", identity.hex()[:12], error,
                        extra={"event": "security_rejection", "tenant": self.config.tenant, "worker": self.config.worker_id})
            self._send(identity, [Msg.PULLED, offset, 0, error])
            return
        self._send(identity, [Msg.PULLED, offset, total], [piece])

    def _run_slices(self) -> None:
        for slot in self.slots:
            slot.settle_device_time()
            # A session spanning several devices is scheduled on its first one only.
            session = slot.scheduler.pick(s for s in slot.sessions if s.slots[0] is slot)
            if session is None:
                continue
            timer = SliceTimer(session.stream)
            started = time.perf_counter()
            # On the CPU backend the device is the CPU, which other tenants' workers share: the
            # process's CPU time (intra-op threads included) is the device time this slice used,
            # where wall time would also count the time the kernel gave other workers.
            cpu_started = time.process_time() if slot.device.type == "cpu" else 0.0
            self.watchdog.started()
            try:
                replies = session.run_slice(SLICE_COMMANDS, SLICE_SECONDS)
            except Exception as exc:  # a bug met by this session's input: it pays, nobody else
                self._drop_offender(session.identity, _failure(exc), error=exc)
                continue
            finally:
                self.watchdog.finished()
            elapsed = time.perf_counter() - started
            used = time.process_time() - cpu_started if slot.device.type == "cpu" else elapsed
            slot.scheduler.charge(session, used)
            slot.record_busy(used)
            session.busy_s += used
            if timer.start is not None:
                timer.finish(session, elapsed)
                slot.timers.append(timer)
            for reply in replies:
                self._send_reply(session.identity, reply)

    # ------------------------------------------------------------------------------------------
    # Control messages from the front
    # ------------------------------------------------------------------------------------------
    def _on_control(self, frames: list[bytes]) -> None:
        """A message from the front. The front is trusted; still, a bad message is logged and
        dropped rather than allowed to stop this tenant's work."""
        try:
            kind, fields = messages.parse(codec.unpackb(frames[0], max_bytes=1 << 20), CONTROL)
            if kind == Ctl.OPEN:
                self._open(messages.SESSION_SPEC.parse(fields[0]))
            elif kind == Ctl.CLOSE:
                for identity, session in list(self.sessions.items()):
                    if session.id == fields[0]:
                        self._tell(identity, fields[1])
                        self._end_session(identity, fields[1])
            elif kind == Ctl.UPDATE:
                self._update(fields[0], fields[1])
            elif kind == Ctl.REPORT:
                self._send_control([Ctl.REPORT, fields[0], self.report()])
            elif kind in (Ctl.GRANT, Ctl.SHRINK) and self.leases is not None:
                self.leases.on_control(kind, fields)
            elif kind == Ctl.STOP:
                self._stopping = True
            else:
                log.warning("worker %s: unexpected control message %s", self.config.worker_id, kind.name)
        except ProtocolError as exc:
            log.error("worker %s: malformed control message: %s", self.config.worker_id, exc)

    def _send_control(self, header: list[Any]) -> None:
        self._control.send(codec.packb(header))

    def _open(self, spec: dict[str, Any]) -> None:
        identity = spec["routing_id"]
        try:
            slots = [self.slots[index] for index in spec["devices"]]
            tenant = policy.Tenant(spec["tenant"], None, spec["memory_quota"], spec["weight"], spec["priority"])
            account = self._accounts.setdefault(tenant.name, TenantAccount(spec["tenant_quota"]))
            session = Session(spec["session"], [slot.device for slot in slots], spec["client"], tenant=tenant,
                              priority=spec["priority"], identity=identity, slots=slots,
                              device_memories=[slot.memory for slot in slots], cuda_graphs=self.config.cuda_graphs,
                              graph_compiler=self.config.graph_compiler, owner=spec.get("owner"), account=account)
        except Exception as exc:  # (IndexError: a device this worker does not have; device errors)
            log.error("worker %s could not open session %s", self.config.worker_id, spec.get("session"), exc_info=exc)
            self._send_control([Ctl.OPENED, spec["session"], f"the worker could not open the session: {exc}"])
            return
        if identity in self.sessions:
            self._end_session(identity, "client said hello again")
        session.max_handles = self.config.max_handles
        session.exports = self.exports
        session.peer_pull = self._pull_from_peer
        for slot in slots:
            slot.sessions.append(session)
            self._cap_device_memory(slot, account.quota)
        self.sessions[identity] = session
        self._gone.pop(identity, None)
        self._send_control([Ctl.OPENED, session.id])

    def _cap_device_memory(self, slot: DeviceSlot, quota: int) -> None:
        """On a GPU, the tenant's quota is also the caching allocator's limit for this process
        (``set_per_process_memory_fraction``): an op whose output is sized by its data, which no
        check before it can see, fails with out-of-memory in this worker instead of taking the
        card. (Under oversubscription the quota may exceed the card: the residency manager's
        lease bounds what is resident, and the fraction stays 1.)"""
        if slot.device.type != "cuda":
            return
        total = slot.facts.total_memory
        if total > 0:
            torch.cuda.set_per_process_memory_fraction(min(1.0, quota / total), slot.device)

    def _update(self, session_id: str, changes: dict[str, Any]) -> None:
        if changes.get("tenant_quota") is not None:
            for session in self.sessions.values():
                if session.id == session_id and session.account is not None:
                    session.account.quota = changes["tenant_quota"]
                    for slot in session.slots:
                        self._cap_device_memory(slot, changes["tenant_quota"])
        for session in self.sessions.values():
            if session.id == session_id:
                if changes.get("memory_quota") is not None:
                    session.memory_quota = changes["memory_quota"]
                if changes.get("weight") is not None:
                    session.weight = changes["weight"]
                if changes.get("priority") is not None:
                    session.priority = changes["priority"]

    def report(self) -> dict[str, Any]:
        """This worker's sessions and devices, for the front's status report."""
        sessions = [{
            "session": s.id, "priority": s.priority, "weight": s.weight,
            "memory_allocated": s.memory.allocated, "memory_peak": s.memory.peak,
            "memory_quota": s.memory_quota, "memory_spilled": s.memory.spilled,
            "queued_batches": len(s.queue), **s.figures(), **s.compile_counts(),
        } for s in self.sessions.values()]
        device_rows = []
        for slot in self.slots:
            if not slot.sessions and slot.busy_s == 0 and slot.memory is None:
                continue
            row: dict[str, Any] = {"index": slot.index, "busy_s": slot.busy_s, "utilization": slot.utilization}
            if slot.device.type != "cpu" and slot.sessions:
                row["memory_free"], row["memory_total"] = devices.memory_info(slot.device)
            if slot.device.type == "cuda" and slot.sessions:
                row["memory_reserved"] = torch.cuda.memory_reserved(slot.device)
            if slot.memory is not None:
                row["residency"] = slot.memory.stats(wait=False)
            device_rows.append(row)
        return {"pid": os.getpid(), "sessions": sessions, "devices": device_rows, "rejected": dict(self.rejected)}

    # ------------------------------------------------------------------------------------------
    # Messages from clients
    # ------------------------------------------------------------------------------------------
    def _on_message(self, frames: list[zmq.Frame]) -> None:
        """Handle one client message. Whatever it holds, only its sender can suffer: a malformed
        one is answered with a protocol error, one that breaks a bound (limits.py) or meets a bug
        ends the sender's session, and the worker goes on."""
        identity = frames[0].bytes
        if len(frames) > 1:
            self._peers.seen(identity, frames[1])
        user_id = auth.user_id_of(frames[0]) if self._authenticator is not None else None
        header: Any = None
        try:
            if len(frames) < 2:
                raise ProtocolError("message has no header frame")
            codec.check(len(frames) - 2 <= limits.MAX_FRAMES_PER_MESSAGE,
                        lambda: f"a message carries at most {limits.MAX_FRAMES_PER_MESSAGE} frames")
            header = torch_codec.unpackb(frames[1].buffer)
            session = self.sessions.get(identity)
            if session is not None and user_id is not None and not auth.same_owner(session.owner, user_id):
                self._refuse_other_owner(identity, header)
                return
            kind, fields = messages.parse(header, messages.MESSAGES, accepted=_CLIENT_MESSAGES, at="a worker")
            if kind != Msg.PULL and auth.export_key_of(user_id) is not None:
                raise ProtocolError("a connection made with an export's key may only PULL that export")
            if kind == Msg.BATCH:
                buffers = [f.buffer for f in frames[2:]]
                if fields[3] or self.stripes.waiting(identity):  # (its frames come on the stripes)
                    self._on_batches(identity, self.stripes.hold(identity, (fields[0], fields[1], fields[2], buffers,
                                                                            fields[3] or [])))
                else:
                    self._on_batch(identity, fields[0], fields[1], fields[2], buffers)
            elif kind == Msg.PING:
                if session is not None:
                    session.last_seen = time.monotonic()
            elif kind == Msg.BYE:
                self._end_session(identity, "client said goodbye")
            elif kind == Msg.PULL:
                self._on_pull(identity, fields[0], fields[1], fields[2], user_id)
            elif kind == Msg.STRIPE:
                self._on_stripe(identity, user_id, fields[0])
            elif kind == Msg.CHUNK:
                self._on_chunk(identity, user_id, fields, frames)
        except limits.LimitExceeded as exc:
            self._count_rejected("limit")
            self._drop_offender(identity, str(exc))
        except ProtocolError as exc:
            self._count_rejected("malformed")
            log.warning("malformed message from %s: %s", self._peer_name(identity), exc,
                        extra=self._log_context(identity, "security_rejection"))
            self._send(identity, [Msg.REPLY, messages.batch_seq(header), [], [ErrorKind.PROTOCOL.value, "", str(exc)]])
        except Exception as exc:  # a bug met by this input: its sender pays, nobody else
            self._drop_offender(identity, _failure(exc), error=exc)

    # ------------------------------------------------------------------------------------------
    # Stripes (stripes.py)
    # ------------------------------------------------------------------------------------------
    def _on_stripe(self, identity: bytes, user_id: str | None, session_routing_id: bytes) -> None:
        """A connection asks to be a stripe of a session: only with the session's own CURVE key."""
        session = self.sessions.get(session_routing_id)
        if self._authenticator is None:
            why: str | None = "stripes are for daemons with --auth-keys (CURVE); plain TCP needs none"
        elif session is None or user_id is None or not auth.same_owner(session.owner, user_id):
            why = "no session of this key has that routing id"
        else:
            why = self.stripes.attach(identity, session_routing_id)
        if why is not None:
            self._count_rejected("stripe")
            log.warning("refused a stripe from %s: %s", identity.hex()[:12], why,
                        extra={"event": "security_rejection", "tenant": self.config.tenant, "worker": self.config.worker_id})
            self._send(identity, [Msg.REFUSED, why])
            return
        self._send(identity, [Msg.STRIPE, session_routing_id])

    def _on_chunk(self, identity: bytes, user_id: str | None, fields: list[Any], frames: list[zmq.Frame]) -> None:
        owner = self.stripes.session_of(identity)
        session = self.sessions.get(owner) if owner is not None else None
        if session is None or owner is None or not auth.same_owner(session.owner, user_id):
            self._count_rejected("stripe")  # (not a stripe, or its session is gone: nothing to feed)
            return
        codec.check(len(frames) == 3, lambda: "a CHUNK carries its piece in one frame")
        try:
            ready = self.stripes.add_chunk(owner, fields[0], fields[1], fields[2], frames[2].buffer)
        except ProtocolError as exc:  # (the session's data is broken: it ends, as for a broken bound)
            self._count_rejected("limit")
            self._drop_offender(owner, f"broken striped transfer: {exc}")
            return
        self._on_batches(owner, ready)

    def _on_batches(self, identity: bytes, batches: list[Any]) -> None:
        for seq, commands, want_reply, buffers, _ in batches:
            self._on_batch(identity, seq, commands, want_reply, buffers)

    def _on_batch(self, identity: bytes, seq: int, commands: list[Any], want_reply: bool, frames: list[Any]) -> None:
        session = self.sessions.get(identity)
        if session is None:
            if want_reply:
                why = self._gone.get(identity, "the front never opened one here for this client")
                error = [ErrorKind.SESSION.value, "", f"this worker has no session for the client ({why}); reconnect"]
                self._send(identity, [Msg.REPLY, seq, [], error])
            return
        nbytes = sum(frame.nbytes for frame in frames)
        session.bytes_in += nbytes
        session.inflow.admit(nbytes, want_reply, len(session.queue), session.queued_bytes)
        session.last_seen = session.last_active = self._last_batch = time.monotonic()
        self._host_memory_trimmed = False
        if not session.has_work():
            session.slots[0].scheduler.rejoin(session)
        session.enqueue(seq, commands, frames, want_reply, nbytes)

    def _send_reply(self, identity: bytes, reply: Reply) -> None:
        if reply.malformed:
            assert reply.error is not None  # (a malformed batch is answered with its protocol error)
            self._count_rejected("malformed")
            log.warning("%s sent a malformed batch: %s", self._peer_name(identity), reply.error[2],
                        extra=self._log_context(identity, "security_rejection"))
        session = self.sessions.get(identity)
        nbytes = sum(memoryview(frame).nbytes for frame in reply.frames) if reply.frames else 0
        if session is not None:
            session.bytes_out += nbytes
        track = session is not None and nbytes >= _TRACKED_REPLY_BYTES
        header, frames, trackers = self.stripes.send_large(
            identity, [Msg.REPLY, reply.seq, reply.results, reply.error], reply.frames or (),
            lambda stripe, parts, tracked: self._outbox.send(stripe, parts, copy=False, track=tracked), track=track)
        tracker = self._send(identity, header, frames, track=track and not trackers)
        if trackers:
            tracker = zmq.MessageTracker(*trackers)
        if session is not None and isinstance(tracker, zmq.MessageTracker):
            session.replies_unsent(tracker, nbytes)

    def _send(self, identity: bytes, header: list[Any], frames: Sequence[Any] = (), *, track: bool = False) -> Any:
        """Send without waiting (outbox.py). A reply that cannot be encoded (an op result msgpack
        cannot carry) goes as an error instead."""
        try:
            data = codec.packb(header)
        except (TypeError, ValueError, OverflowError) as exc:
            log.error("could not encode a message for %s: %s", self._peer_name(identity), exc)
            if header[0] != Msg.REPLY:
                return
            seq = header[1] if type(header[1]) is int else None
            data = codec.packb([Msg.REPLY, seq, [], [ErrorKind.OP.value, "", f"the daemon could not encode "
                                                     f"this reply ({exc}); report this to libremote"]])
            frames = ()
        return self._outbox.send(identity, [data, *frames], copy=not frames, track=track and bool(frames))

    def _tell(self, identity: bytes, why: str) -> None:
        """Tell a client its session ended (a REPLY with no seq: the client raises it)."""
        self._send(identity, [Msg.REPLY, None, [], [ErrorKind.SESSION.value, "", why]])

    def _peer_name(self, identity: bytes) -> str:
        session = self.sessions.get(identity)
        return f"session {session.id}" if session is not None else f"peer {identity.hex()[:12]}"

    def _drop_offender(self, identity: bytes, why: str, *, error: BaseException | None = None) -> None:
        """End the session of a peer whose input broke a bound or met a bug: tell it why, log it
        (with the traceback, for a bug), and serve the tenant's other sessions as before."""
        context = self._log_context(identity, "eviction")
        if error is not None:
            self._count_rejected("failure")
            log.error("%s: %s", self._peer_name(identity), why, exc_info=error, extra=context)
        else:
            log.warning("%s: %s", self._peer_name(identity), why, extra=context)
        self._send(identity, [Msg.REPLY, None, [], [ErrorKind.PROTOCOL.value, "",
                                                     f"{why}. The daemon closed this client's session."]])
        self._end_session(identity, why, notice=f"{why}. The daemon closed this client's session.")

    def _count_rejected(self, why: str) -> None:
        self.rejected[why] = self.rejected.get(why, 0) + 1

    def _log_context(self, identity: bytes, event: str) -> dict[str, Any]:
        """The fields a structured log line (``--log-format json``) carries about a session."""
        session = self.sessions.get(identity)
        context: dict[str, Any] = {"event": event, "tenant": self.config.tenant, "worker": self.config.worker_id}
        if session is not None:
            context["session"] = session.id
        return context

    def _on_outbox_full(self, identity: bytes) -> None:
        """A peer does not take its messages (it sends and never reads): its session ends (a
        stripe's: the session it belongs to, whose reply can no longer arrive whole)."""
        identity = self.stripes.session_of(identity) or identity
        if identity in self.sessions:
            why = (f"its client did not read its replies ({limits.OUTBOX_MESSAGES} messages were waiting for it); "
                   "the daemon never waits for one client")
            log.warning("%s: %s", self._peer_name(identity), why, extra=self._log_context(identity, "eviction"))
            self._end_session(identity, why, notice=f"the daemon closed this session: {why}")

    def _refuse_other_owner(self, identity: bytes, header: Any) -> None:
        """Answer a message for another identity's session without touching the session."""
        self._count_rejected("other_owner")
        log.warning("refused a message from %s: its routing id belongs to another identity's session",
                    identity.hex()[:12], extra=self._log_context(identity, "security_rejection"))
        reason = ("this connection's routing id belongs to a session opened with another key; "
                  "use a fresh random routing id (the libremote client does)")
        if type(header) is list and len(header) == 4 and header[0] == Msg.BATCH and header[3] is True:
            self._send(identity, [Msg.REPLY, messages.batch_seq(header), [], [ErrorKind.SESSION.value, "", reason]])

    # ------------------------------------------------------------------------------------------
    # Housekeeping
    # ------------------------------------------------------------------------------------------
    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now < self._next_housekeeping:
            return
        self._next_housekeeping = now + _HOUSEKEEPING_S
        idle_timeout = self.config.idle_timeout_s
        for identity, session in list(self.sessions.items()):
            silent = now - session.last_seen
            if silent > self.config.heartbeat_timeout_s:
                why = f"client silent for {silent:.0f} s: killed, hung or unreachable"
                self._end_session(identity, why, notice=f"the daemon closed this session: {why}")
            elif idle_timeout is not None and not session.has_work() and now - session.last_active > idle_timeout:
                why = f"idle for more than {idle_timeout:g} s (--idle-timeout)"
                self._tell(identity, f"the daemon closed this session: {why}")
                self._end_session(identity, why, notice=f"the daemon closed this session: {why}")
            else:
                try:
                    session.reclaim_captures()
                except Exception as exc:  # (as in a slice: the session's own state; it pays)
                    self._drop_offender(identity, _failure(exc), error=exc)
        self.exports.expire()
        for slot in self.slots:
            slot.refresh_utilization()
        if (self._host_memory_kept and not self._host_memory_trimmed and now - self._last_batch > _IDLE_TRIM_S
                and not any(session.has_work() for session in self.sessions.values())):
            host_memory.give_back_freed_memory()
            self._host_memory_trimmed = True

    def _end_session(self, identity: bytes, why: str, *, notice: str | None = None) -> None:
        """Close a session and tell the front; ``notice``: what its client is to be told, when
        the client did not end the session itself (the front tells it: the client may read from
        this worker only after it is gone)."""
        session = self.sessions.pop(identity, None)
        if session is None:
            return
        self._peers.forget(identity)
        for stripe in self.stripes.forget_session(identity):
            self._peers.forget(stripe)
        for slot in session.slots:
            slot.sessions.remove(session)
        self.exports.drop_session(session.id)
        figures = session.figures()
        released = session.close()
        self._gone[identity] = f"session {session.id} was closed: {why}"
        while len(self._gone) > 4096:
            self._gone.popitem(last=False)
        log.info("session %s closed (%s), released %d bytes", session.id, why, released,
                 extra={"event": "session_end", "session": session.id, "tenant": self.config.tenant,
                        "worker": self.config.worker_id, "released_bytes": released, "why": why})
        if self.leases is not None:
            for slot in session.slots:
                if not slot.sessions:
                    self.leases.release_all(slot.index)
        self._send_control([Ctl.ENDED, session.id, why[:1000], released, notice[:1000] if notice else None, figures])


def _is_pull(header: zmq.Frame) -> bool:
    """Whether a header frame is a PULL (a fixarray whose first item is Msg.PULL), without decoding it."""
    data = header.bytes[:2]
    return len(data) == 2 and 0x90 <= data[0] <= 0x9f and data[1] == Msg.PULL


def _failure(exc: BaseException) -> str:
    """What the log and the offending client are told when its input met a bug in the worker."""
    return f"the daemon failed on this client's input ({type(exc).__name__}: {str(exc)[:300]})"
