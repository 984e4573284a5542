"""The daemon's loop: a ZeroMQ ROUTER, the sessions behind it, and the scheduler between them.

One thread owns the socket and every session. Each turn of the loop it takes in every message
that has arrived (HELLO, BATCH, PING, STATUS, ADMIN, ...), does its housekeeping (reclaiming
sessions whose clients went silent or idle, admitting queued clients), and then, per device,
runs one slice of work for the session the scheduler picks. Batches are queued per session, so a
client streaming a long run of ops never keeps another's work waiting longer than a slice.
Ops are launched on accelerators asynchronously; the loop waits on a device only where a client
asked for data back. Whatever a client sends, the loop answers it or drops it and keeps serving.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch
import zmq

import libremote
from libremote import protocol
from libremote.zmq_events import readable
from libremote.protocol import ErrorKind, Msg, ProtocolError

from . import auth, devices, host_memory, limits, messages, outbox, pool
from .auth import is_loopback_peer  # noqa: F401 (its home was here; tests import it from here)
from .pool import PoolConfig, PolicyError, Tenant
from .residency import default_device_budget, DeviceMemory
from .scheduler import Scheduler
from .session import Reply, Session

log = logging.getLogger("libremote.server")

#: A slice runs at most this many commands, or this long, before the scheduler may pick another
#: session (time matters on the CPU backend, where a command is its compute; on a GPU launches
#: are asynchronous and the command count bounds the slice).
SLICE_COMMANDS = 64
SLICE_SECONDS = 0.002
_HOUSEKEEPING_S = 0.5
_IDLE_TRIM_S = 2.0  # no batch for this long: the daemon gives kept host memory back
_UTILIZATION_WINDOW_S = 2.0


@dataclass
class DeviceSlot:
    """One device of the pool: its facts, its sessions and their scheduler."""

    index: int
    device: torch.device
    facts: devices.DeviceFacts
    scheduler: Scheduler = field(default_factory=Scheduler)
    sessions: list[Session] = field(default_factory=list)
    memory: DeviceMemory | None = None  # residency manager, when oversubscription is on
    busy_s: float = 0.0
    utilization: float = 0.0
    timers: collections.deque = field(default_factory=collections.deque)  # SliceTimers in flight
    _window_start: float = field(default_factory=time.monotonic)
    _window_busy: float = 0.0

    def settle_device_time(self) -> None:
        """Charge sessions for the device time of their finished GPU slices (see SliceTimer)."""
        while self.timers:
            extra = self.timers[0].device_extra_s()
            if extra is None:
                return
            timer = self.timers.popleft()
            if extra and timer.session.slots:
                self.scheduler.charge(timer.session, extra)
                timer.session.busy_s += extra
                self.record_busy(extra)

    def record_busy(self, seconds: float) -> None:
        self.busy_s += seconds
        self._window_busy += seconds
        now = time.monotonic()
        if now - self._window_start >= _UTILIZATION_WINDOW_S:
            self.utilization = min(1.0, self._window_busy / (now - self._window_start))
            self._window_start, self._window_busy = now, 0.0

    def refresh_utilization(self) -> None:
        if time.monotonic() - self._window_start >= 2 * _UTILIZATION_WINDOW_S:
            self.record_busy(0.0)


class SliceTimer:
    """Device time of one slice on a GPU: events around it on the session's stream.

    A slice is charged its host time at once (kernels launch asynchronously, so that is the launch
    cost); once the events have completed, whatever the device took beyond that is charged too, so
    a session with long kernels pays for them in the fair share.
    """

    __slots__ = ("start", "end", "session", "host_s")

    def __init__(self, stream: Any) -> None:
        self.start = self.end = self.session = None
        self.host_s = 0.0
        if stream is not None:
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record(stream)

    def finish(self, session: Session, host_s: float) -> None:
        self.end = torch.cuda.Event(enable_timing=True)
        self.end.record(session.stream)
        self.session, self.host_s = session, host_s

    def device_extra_s(self) -> float | None:
        """Device time beyond the host time already charged, or None while still running."""
        if not self.end.query():
            return None
        return max(0.0, self.start.elapsed_time(self.end) / 1000.0 - self.host_s)


@dataclass
class Waiting:
    """A client in the admission queue."""

    identity: bytes
    info: dict[str, Any]
    tenant: Tenant
    priority: str
    device_count: int = 1
    owner: str | None = None  # the ZAP User-Id it said HELLO with (CURVE), see server/auth.py
    since: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)


class Daemon:
    """Serve clients on ``address`` with ops executed on a pool of ``device_list``."""

    def __init__(
        self,
        address: str,
        device_list: list[torch.device],
        *,
        pool_config: PoolConfig | None = None,
        max_message_bytes: int = limits.MAX_MESSAGE_BYTES,
        heartbeat_s: float = 2.0,
        heartbeat_timeout_s: float = 10.0,
        spin_us: int = 300,
        keyring: auth.KeyRing | None = None,
        loopback_admin: bool = False,
    ) -> None:
        # This process is a daemon: it must drive the real devices. Importing the package ran
        # libremote/__init__.py, which pointed torch.cuda at a daemon; undo that first.
        from libremote.client import activation

        activation.deactivate()
        self.pool = pool_config or PoolConfig()
        self.slots = [DeviceSlot(index, device, devices.describe(device)) for index, device in enumerate(device_list)]
        if self.pool.manages_residency:
            for slot in self.slots:
                budget = self.pool.device_memory
                if budget is None:
                    budget = default_device_budget(slot.device, slot.facts.total_memory)
                slot.memory = DeviceMemory(slot.device, budget, self.pool.host_spill)
        self.heartbeat_s = heartbeat_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        #: After a message, the loop polls without sleeping this long before it blocks: a thread
        #: that sleeps pays the OS's wake-up for the next message (tens of microseconds on a VM),
        #: on every round trip of a client that syncs often.
        self.spin_s = spin_us / 1e6
        self.sessions: dict[bytes, Session] = {}
        self.waiting: list[Waiting] = []
        self._gone: collections.OrderedDict[bytes, str] = collections.OrderedDict()
        self._next_housekeeping = 0.0
        #: Freed host buffers are kept for reuse while sessions work (server/host_memory.py),
        #: and given back once no batch has arrived for this long.
        self._host_memory_kept = host_memory.keep_freed_memory()
        self._last_batch = time.monotonic()
        self._host_memory_trimmed = True
        self._stop = threading.Event()
        self._context = zmq.Context.instance()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        outbox.configure(self._socket)
        self._outbox = outbox.Outbox(self._socket, self._on_outbox_full)
        # ZMTP heartbeats: a peer whose host vanished is disconnected instead of lingering.
        self._socket.setsockopt(zmq.HEARTBEAT_IVL, int(heartbeat_s * 1000))
        self._socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(heartbeat_s * 3000))
        #: CURVE (--auth-keys): the ZAP handler that vets keys, None on plain TCP (server/auth.py).
        self._authenticator = auth.secure(self._socket, keyring) if keyring is not None else None
        self.loopback_admin = loopback_admin
        if address.endswith(":0"):
            port = self._socket.bind_to_random_port(address.rsplit(":", 1)[0])
            address = f"{address.rsplit(':', 1)[0]}:{port}"
        else:
            self._socket.bind(address)
        self.address = self._socket.getsockopt_string(zmq.LAST_ENDPOINT) or address
        torch.set_grad_enabled(False)

    # ------------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to finish (safe from a signal handler or another thread)."""
        self._stop.set()

    def serve_forever(self) -> None:
        names = ", ".join(f"{slot.device} ({slot.facts.name})" for slot in self.slots)
        log.info(
            "libremote-server %s listening on %s, executing on %s, torch %s, protocol %d",
            libremote.__version__, self.address, names, torch.__version__, protocol.PROTOCOL_VERSION,
        )
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        last_message = 0.0
        try:
            while not self._stop.is_set():
                if self._take_messages():
                    last_message = time.perf_counter()
                elif not any(session.has_work() for session in self.sessions.values()):
                    if time.perf_counter() - last_message < self.spin_s:
                        os.sched_yield()  # see --spin-us: poll again without sleeping
                    elif poller.poll(50):  # (short: a stop request is seen within 50 ms)
                        self._take_messages()
                        last_message = time.perf_counter()
                self._housekeeping()
                self._run_slices()
        finally:
            for identity in list(self.sessions):
                self._end_session(identity, "daemon stopping")
            self._socket.close(0)
            if self._authenticator is not None:
                self._authenticator.stop()
            log.info("libremote-server stopped")

    def _take_messages(self, limit: int = 256) -> int:
        """Handle the messages waiting (at most ``limit``) without blocking; return how many."""
        for taken in range(limit):
            if not readable(self._socket):
                return taken  # (asked first: a receive that raises zmq.Again costs ~10 us)
            self._on_message(self._socket.recv_multipart(zmq.NOBLOCK, copy=False))
        return limit

    def _run_slices(self) -> None:
        for slot in self.slots:
            slot.settle_device_time()
            # A session spanning several devices is scheduled on its first one only.
            session = slot.scheduler.pick(s for s in slot.sessions if s.slots[0] is slot)
            if session is None:
                continue
            timer = SliceTimer(session.stream)
            started = time.perf_counter()
            try:
                replies = session.run_slice(SLICE_COMMANDS, SLICE_SECONDS)
            except Exception as exc:  # a bug met by this session's input: it pays, nobody else
                self._drop_offender(session.identity, _failure(exc), error=exc)
                continue
            elapsed = time.perf_counter() - started
            slot.scheduler.charge(session, elapsed)
            slot.record_busy(elapsed)
            if timer.start is not None:
                timer.finish(session, elapsed)
                slot.timers.append(timer)
            for reply in replies:
                self._send_reply(session.identity, reply)

    # ------------------------------------------------------------------------------------------
    # Messages
    # ------------------------------------------------------------------------------------------
    def _on_message(self, frames: list[zmq.Frame]) -> None:
        """Handle one message. Whatever it holds, only its sender can suffer: a malformed one
        is answered with a protocol error, one that breaks a bound (server/limits.py) or meets
        a bug ends the sender's session, and the daemon goes on."""
        identity = frames[0].bytes
        # The CURVE key's identity (None on plain TCP, where no message has one: not asked).
        user_id = auth.user_id_of(frames[0]) if self._authenticator is not None else None
        header: Any = None
        try:
            if len(frames) < 2:
                raise ProtocolError("message has no header frame")
            protocol.check(len(frames) - 2 <= limits.MAX_FRAMES_PER_MESSAGE,
                           lambda: f"a message carries at most {limits.MAX_FRAMES_PER_MESSAGE} frames")
            header = protocol.unpackb(frames[1].buffer)
            if not isinstance(header, list) or not header or not isinstance(header[0], int):
                raise ProtocolError("header must be an array starting with a message kind")
            kind = header[0]
            if (user_id is not None and kind in (Msg.BATCH, Msg.PING, Msg.HELLO, Msg.BYE)
                    and self._held_by_another(identity, user_id)):
                self._refuse_other_owner(identity, kind, header)
            elif kind == Msg.BATCH:
                seq, commands, want_reply = messages.batch_envelope(header)
                self._on_batch(identity, seq, commands, want_reply, [f.buffer for f in frames[2:]])
            elif kind == Msg.PING:
                self._on_ping(identity)
            elif kind == Msg.HELLO:
                protocol.check(len(header) == 2 and isinstance(header[1], dict), "HELLO is [HELLO, info]")
                try:
                    info = messages.hello_info(header[1])
                except PolicyError as exc:
                    self._refuse(identity, str(exc))
                    return
                self._on_hello(identity, info, user_id)
            elif kind == Msg.BYE:
                self._end_session(identity, "client said goodbye")
                self.waiting = [w for w in self.waiting if w.identity != identity]
            elif kind == Msg.STATUS:
                protocol.check(len(header) == 1 or (len(header) == 2 and isinstance(header[1], dict)),
                               "STATUS is [STATUS] or [STATUS, credentials]")
                try:
                    credentials = messages.status_credentials(header[1]) if len(header) == 2 else {}
                except PolicyError as exc:
                    self._refuse(identity, str(exc))
                    return
                self._on_status(identity, credentials, user_id, frames[1].get("Peer-Address"))
            elif kind == Msg.ADMIN:
                protocol.check(len(header) == 2 and isinstance(header[1], dict), "ADMIN is [ADMIN, request]")
                try:
                    answer = self._on_admin(messages.admin_request(header[1]), user_id, frames[1].get("Peer-Address"))
                except PolicyError as exc:
                    answer = {"ok": False, "message": str(exc)}
                self._send(identity, [Msg.ADMIN, answer])
            else:
                raise ProtocolError(f"unknown message kind {kind}")
        except limits.LimitExceeded as exc:
            self._drop_offender(identity, str(exc), user_id=user_id)
        except ProtocolError as exc:
            log.warning("malformed message from %s: %s", self._peer_name(identity), exc)
            self._send(identity, [Msg.REPLY, messages.batch_seq(header), [], [ErrorKind.PROTOCOL.value, "", str(exc)]])
        except Exception as exc:  # a bug met by this input: its sender pays, nobody else
            self._drop_offender(identity, _failure(exc), error=exc, user_id=user_id)

    def _peer_name(self, identity: bytes) -> str:
        """How the log names a peer: its session, or its routing id."""
        session = self.sessions.get(identity)
        return f"session {session.id}" if session is not None else f"peer {identity.hex()[:12]}"

    def _drop_offender(self, identity: bytes, why: str, *, error: BaseException | None = None,
                       user_id: str | None = None) -> None:
        """End the session of a peer whose input broke a bound or met a bug: tell it why, log
        it (with the traceback, for a bug), and serve everyone else as before. (Under CURVE, a
        peer using another identity's routing id ends nothing but gets the answer.)"""
        if error is not None:
            log.error("%s: %s", self._peer_name(identity), why, exc_info=error)
        else:
            log.warning("%s: %s", self._peer_name(identity), why)
        if user_id is not None and self._held_by_another(identity, user_id):
            self._send(identity, [Msg.REPLY, None, [], [ErrorKind.PROTOCOL.value, "", why]])
            return
        self._send(identity, [Msg.REPLY, None, [], [ErrorKind.PROTOCOL.value, "",
                                                     f"{why}. The daemon closed this client's session."]])
        self._end_session(identity, why)
        self.waiting = [w for w in self.waiting if w.identity != identity]

    def _on_outbox_full(self, identity: bytes) -> None:
        """A peer does not take its messages (it sends and never reads): its session ends, so
        the daemon stops working for it. (Nothing can be sent to tell it.)"""
        if identity in self.sessions:
            why = (f"its client did not read its replies ({limits.OUTBOX_MESSAGES} messages were waiting for it); "
                   "the daemon never waits for one client")
            log.warning("%s: %s", self._peer_name(identity), why)
            self._end_session(identity, why)
        self.waiting = [w for w in self.waiting if w.identity != identity]

    def _held_by_another(self, identity: bytes, user_id: str | None) -> bool:
        """Whether ``identity`` (a routing id) has a session or queue place opened by another
        authenticated identity: a peer that reconnected with a dropped client's routing id."""
        session = self.sessions.get(identity)
        owners = ([session.owner] if session is not None else []) + [w.owner for w in self.waiting if w.identity == identity]
        return any(not auth.same_owner(owner, user_id) for owner in owners)

    def _refuse_other_owner(self, identity: bytes, kind: int, header: list[Any]) -> None:
        """Answer a message for another identity's session without touching the session."""
        log.warning("refused a message from %s: its routing id belongs to another identity's session",
                    identity.hex()[:12])
        reason = ("this connection's routing id belongs to a session opened with another key; "
                  "use a fresh random routing id (the libremote client does)")
        if kind == Msg.HELLO:
            self._send(identity, [Msg.REFUSED, reason])
        elif kind == Msg.BATCH and len(header) == 4 and header[3]:
            self._send(identity, [Msg.REPLY, header[1], [], [ErrorKind.SESSION.value, "", reason]])

    def _on_ping(self, identity: bytes) -> None:
        session = self.sessions.get(identity)
        if session is not None:
            session.last_seen = time.monotonic()
            return
        for waiter in self.waiting:
            if waiter.identity == identity:
                waiter.last_seen = time.monotonic()

    def _on_batch(self, identity: bytes, seq: Any, commands: Any, want_reply: bool, frames: list[Any]) -> None:
        session = self.sessions.get(identity)
        if session is None:
            if want_reply:
                why = self._gone.get(identity, "it restarted, or never admitted this client")
                error = [ErrorKind.SESSION.value, "", f"this daemon has no session for the client ({why}); reconnect"]
                self._send(identity, [Msg.REPLY, seq, [], error])
            return
        nbytes = sum(frame.nbytes for frame in frames)
        session.inflow.admit(nbytes, want_reply, len(session.queue), session.queued_bytes)
        session.last_seen = session.last_active = self._last_batch = time.monotonic()
        self._host_memory_trimmed = False
        if not session.has_work():
            session.slots[0].scheduler.rejoin(session)
        session.enqueue(seq, commands, frames, want_reply, nbytes)

    def _send_reply(self, identity: bytes, reply: Reply) -> None:
        if reply.malformed:
            log.warning("%s sent a malformed batch: %s", self._peer_name(identity), reply.error[2])
        self._send(identity, [Msg.REPLY, reply.seq, reply.results, reply.error], reply.frames)

    def _send(self, identity: bytes, header: list[Any], frames: list[Any] = ()) -> None:
        """Send without waiting (server/outbox.py). A reply that cannot be encoded (an op result
        msgpack cannot carry) goes as an error instead."""
        try:
            data = protocol.packb(header)
        except (TypeError, ValueError, OverflowError) as exc:
            log.error("could not encode a message for %s: %s", self._peer_name(identity), exc)
            if header[0] != Msg.REPLY:
                return
            seq = header[1] if type(header[1]) is int else None
            data = protocol.packb([Msg.REPLY, seq, [], [ErrorKind.OP.value, "", f"the daemon could not encode "
                                                        f"this reply ({exc}); report this to libremote"]])
            frames = ()
        self._outbox.send(identity, [data, *frames], copy=not frames)

    # ------------------------------------------------------------------------------------------
    # Admission: HELLO, the queue, placement
    # ------------------------------------------------------------------------------------------
    def _on_hello(self, identity: bytes, info: dict[str, Any], user_id: str | None = None) -> None:
        client_protocol = info.get("protocol")
        if client_protocol != protocol.PROTOCOL_VERSION:
            self._refuse(identity, (
                f"protocol mismatch: the client speaks libremote protocol {client_protocol} "
                f"(libremote {info.get('libremote')}), this daemon speaks {protocol.PROTOCOL_VERSION} "
                f"(libremote {libremote.__version__}); install the same libremote release on both sides"
            ))
            return
        try:
            tenant = (self.pool.tenant_of_key(auth.Identity.from_user_id(user_id)) if user_id is not None
                      else self.pool.authenticate(info.get("tenant"), info.get("token")))
            if not any(tenant.allows_device(slot.facts.name) for slot in self.slots):
                raise PolicyError(f"tenant {tenant.name!r} may use {tenant.device_names}, and this daemon has "
                                  f"{[slot.facts.name for slot in self.slots]}")
            priority = self._admitted_priority(tenant, info.get("priority"))
            device_count = self._requested_devices(info, tenant)
        except PolicyError as exc:
            self._refuse(identity, str(exc))
            return
        if identity in self.sessions:
            self._end_session(identity, "client said hello again")
        self.waiting = [w for w in self.waiting if w.identity != identity]
        if self.pool.oversubscribe is not None and not any(
                tenant.allows_device(slot.facts.name) and self._quota_fits(slot, tenant.memory_quota, alone=True)
                for slot in self.slots):
            self._refuse(identity, f"tenant {tenant.name!r}'s memory quota ({tenant.memory_quota} bytes) is more "
                                   f"than --oversubscribe {self.pool.oversubscribe:g} lets any device admit")
            return
        waiter = Waiting(identity, info, tenant, priority, device_count, owner=user_id)
        if not self._admit(waiter):
            if len(self.waiting) >= limits.MAX_WAITING:
                self._refuse(identity, f"the admission queue is full ({limits.MAX_WAITING} clients wait); try later")
                return
            self.waiting.append(waiter)
            position = self._queue_position(waiter)
            reason = ("every device has its maximum number of sessions (--max-sessions)"
                      if self._sessions_full(tenant) else
                      "admitting it would commit more memory than --oversubscribe allows")
            log.info("client pid %s (tenant %s) queued at position %d: %s", info.get("pid"), tenant.name, position, reason)
            self._send(identity, [Msg.QUEUED, {"position": position, "heartbeat_s": self.heartbeat_s, "reason": reason}])

    def _admitted_priority(self, tenant: Tenant, requested: Any) -> str:
        priority = pool.parse_priority(requested) if requested else "normal"
        if self.pool.has_tenants and pool.PRIORITIES[priority] > pool.PRIORITIES[tenant.priority]:
            return tenant.priority  # a tenant's priority is its clients' ceiling
        return priority

    def _place(self, tenant: Tenant, count: int) -> list[DeviceSlot] | None:
        """``count`` distinct devices for a new session, by the placement policy, or None."""
        limit = self.pool.max_sessions_per_device
        candidates = [slot for slot in self.slots
                      if tenant.allows_device(slot.facts.name) and (limit is None or len(slot.sessions) < limit)
                      and self._quota_fits(slot, tenant.memory_quota)]
        if len(candidates) < count:
            return None
        if self.pool.placement == "spread":
            ordered = sorted(candidates, key=lambda slot: (len(slot.sessions), slot.index))
        elif limit is None:  # binpack without a limit: everyone on the first allowed devices
            ordered = candidates
        else:  # binpack: the fullest device that still has room first
            ordered = sorted(candidates, key=lambda slot: (-len(slot.sessions), slot.index))
        return ordered[:count]

    def _quota_fits(self, slot: DeviceSlot, quota: int, *, alone: bool = False) -> bool:
        """With --oversubscribe R, the quotas of a device's sessions add up to at most R times
        its memory (the device budget, or its real size)."""
        if self.pool.oversubscribe is None:
            return True
        capacity = self.pool.device_memory or slot.facts.total_memory
        committed = 0 if alone else sum(session.memory_quota for session in slot.sessions)
        return committed + quota <= self.pool.oversubscribe * capacity

    def _sessions_full(self, tenant: Tenant) -> bool:
        limit = self.pool.max_sessions_per_device
        return limit is not None and all(len(slot.sessions) >= limit for slot in self.slots
                                         if tenant.allows_device(slot.facts.name))

    def _requested_devices(self, info: dict[str, Any], tenant: Tenant) -> int:
        count = info.get("devices", 1)
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise PolicyError(f"LIBREMOTE_DEVICES must be a positive integer (got {count!r})")
        available = sum(1 for slot in self.slots if tenant.allows_device(slot.facts.name))
        if count > available:
            raise PolicyError(f"asked for {count} devices (LIBREMOTE_DEVICES); this daemon can give "
                              f"tenant {tenant.name!r} at most {available}")
        return count

    def _admit(self, waiter: Waiting) -> bool:
        slots = self._place(waiter.tenant, waiter.device_count)
        if slots is None:
            return False
        session = Session(uuid.uuid4().hex[:12], [s.device for s in slots], waiter.info, tenant=waiter.tenant,
                          priority=waiter.priority, identity=waiter.identity, slots=slots,
                          device_memories=[s.memory for s in slots], cuda_graphs=self.pool.cuda_graphs,
                          graph_compiler=self.pool.graph_compiler, owner=waiter.owner)
        for placed in slots:
            placed.sessions.append(session)
        session.max_handles = self.pool.max_handles
        self.sessions[waiter.identity] = session
        self._gone.pop(waiter.identity, None)
        info = waiter.info
        log.info(
            "session %s opened on %s: tenant %s, priority %s, pid %s on %s, torch %s",
            session.id, ", ".join(f"{s.index}:{s.device}" for s in slots), waiter.tenant.name, waiter.priority, info.get("pid"), info.get("host"),
            info.get("torch"),
        )
        self._send(waiter.identity, [Msg.WELCOME, {
            "session": session.id,
            "protocol": protocol.PROTOCOL_VERSION,
            #: What this daemon understands beyond protocol 1's first release (clients check).
            "features": ["settings", "memory_fraction", "program_options", "generators"],
            "libremote": libremote.__version__,
            "torch": torch.__version__,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "devices": [placed.facts.to_wire() for placed in slots],
            "heartbeat_s": self.heartbeat_s,
            "tenant": waiter.tenant.name,
            "priority": waiter.priority,
            "memory_quota": session.memory_quota,
        }])
        return True

    def _queue_position(self, waiter: Waiting) -> int:
        return sorted(self.waiting, key=self._queue_order).index(waiter) + 1

    @staticmethod
    def _queue_order(waiter: Waiting) -> tuple[int, float]:
        return (-pool.PRIORITIES[waiter.priority], waiter.since)

    def _refuse(self, identity: bytes, reason: str) -> None:
        log.warning("refused %s: %s", identity.hex()[:12], reason)
        self._send(identity, [Msg.REFUSED, reason])

    # ------------------------------------------------------------------------------------------
    # Housekeeping: reclaim, admit
    # ------------------------------------------------------------------------------------------
    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now < self._next_housekeeping:
            return
        self._next_housekeeping = now + _HOUSEKEEPING_S
        for identity, session in list(self.sessions.items()):
            silent = now - session.last_seen
            if silent > self.heartbeat_timeout_s:
                self._end_session(identity, f"client silent for {silent:.0f} s: killed, hung or unreachable")
            elif (self.pool.idle_timeout_s is not None and not session.has_work()
                  and now - session.last_active > self.pool.idle_timeout_s):
                self._end_session(identity, f"idle for more than {self.pool.idle_timeout_s:g} s (--idle-timeout)")
            else:
                try:
                    session.reclaim_captures()
                except Exception as exc:  # (as in a slice: the session's own state; it pays)
                    self._drop_offender(identity, _failure(exc), error=exc)
        self.waiting = [w for w in self.waiting if now - w.last_seen <= self.heartbeat_timeout_s]
        for waiter in sorted(self.waiting, key=self._queue_order):
            if self._admit(waiter):
                self.waiting.remove(waiter)
        for slot in self.slots:
            slot.refresh_utilization()
        if (self._host_memory_kept and not self._host_memory_trimmed and now - self._last_batch > _IDLE_TRIM_S
                and not any(session.has_work() for session in self.sessions.values())):
            host_memory.give_back_freed_memory()
            self._host_memory_trimmed = True

    def _end_session(self, identity: bytes, why: str) -> None:
        session = self.sessions.pop(identity, None)
        if session is None:
            return
        for slot in session.slots:
            slot.sessions.remove(session)
        released = session.close()
        self._gone[identity] = f"session {session.id} was closed: {why}"
        while len(self._gone) > 4096:
            self._gone.popitem(last=False)
        log.info("session %s closed (%s), released %d bytes", session.id, why, released)

    # ------------------------------------------------------------------------------------------
    # Status and live changes
    # ------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        device_rows = []
        for slot in self.slots:
            free, total = devices.memory_info(slot.device)
            if slot.memory is not None and slot.memory.budget is not None:
                total = min(total, slot.memory.budget)  # what the pool may keep resident
            device_rows.append({
                "index": slot.index, "device": str(slot.device), "name": slot.facts.name,
                "memory_used": sum(s.memory.allocated for s in slot.sessions if s.slots[0] is slot),
                "memory_total": total,
                "memory_free": free, "utilization": slot.utilization, "sessions": len(slot.sessions),
                "busy_s": slot.busy_s,
                **({"residency": slot.memory.stats()} if slot.memory is not None else {}),
            })
        session_rows = [{
            "session": s.id, "tenant": s.tenant.name, "priority": s.priority, "weight": s.weight,
            "device": s.slots[0].index, "devices": [slot.index for slot in s.slots], "memory_allocated": s.memory.allocated, "memory_peak": s.memory.peak,
            "memory_quota": s.memory_quota, "memory_spilled": s.memory.spilled,
            "ops": s.ops_executed, "device_time_s": s.busy_s,
            "queued_batches": len(s.queue), "pid": s.client_info.get("pid"), "host": s.client_info.get("host"),
            "age_s": time.time() - s.created, **s.compile_counts(),
        } for s in self.sessions.values()]
        waiting_rows = [{"tenant": w.tenant.name, "priority": w.priority, "waited_s": now - w.since,
                         "pid": w.info.get("pid"), "host": w.info.get("host")}
                        for w in sorted(self.waiting, key=self._queue_order)]
        return {"daemon": {"address": self.address, "libremote": libremote.__version__, "torch": torch.__version__,
                           "pid": os.getpid(), "host": socket.gethostname(), "graph_compiler": self.pool.graph_compiler},
                "devices": device_rows, "sessions": session_rows, "waiting": waiting_rows}

    def _on_status(self, identity: bytes, request: dict[str, Any], user_id: str | None, peer: str | None) -> None:
        """The status report, as much of it as the requester may see (server/auth.py)."""
        viewer = auth.requester(self.pool, user_id, request, peer, loopback_admin=self.loopback_admin)
        if viewer.refusal:
            self._send(identity, [Msg.REFUSED, viewer.refusal])
        else:
            self._send(identity, [Msg.STATUS, auth.visible_status(self.status(), viewer)])

    def _on_admin(self, request: dict[str, Any], user_id: str | None, peer: str | None) -> dict[str, Any]:
        viewer = auth.requester(self.pool, user_id, request, peer, loopback_admin=self.loopback_admin)
        if not viewer.is_admin:
            return {"ok": False, "message": viewer.refusal or auth.admin_refusal(viewer, curve=user_id is not None)}
        try:
            return self._apply_admin(request)
        except PolicyError as exc:
            return {"ok": False, "message": str(exc)}

    def _apply_admin(self, request: dict[str, Any]) -> dict[str, Any]:
        changes = {key: request[key] for key in ("memory_quota", "weight", "priority") if request.get(key) is not None}
        if not changes:
            raise PolicyError("nothing to change: give memory_quota, weight and/or priority")
        quota = pool.parse_size(changes["memory_quota"]) if "memory_quota" in changes else None
        weight = pool.parse_weight(changes["weight"]) if "weight" in changes else None
        priority = pool.parse_priority(changes["priority"]) if "priority" in changes else None
        session_id, tenant_name = request.get("session"), request.get("tenant")
        if bool(session_id) == bool(tenant_name):
            raise PolicyError("name exactly one target: a session id or a tenant")
        if tenant_name:
            tenant = self.pool.tenants.get(tenant_name)
            if tenant is not None:  # future sessions of the tenant too
                tenant.memory_quota = quota or tenant.memory_quota
                tenant.weight = weight or tenant.weight
                tenant.priority = priority or tenant.priority
            targets = [s for s in self.sessions.values() if s.tenant.name == tenant_name]
            if tenant is None and not targets:
                raise PolicyError(f"no tenant or session of tenant {tenant_name!r}")
        else:
            targets = [s for s in self.sessions.values() if s.id == session_id]
            if not targets:
                raise PolicyError(f"no session {session_id!r} (see libremote status)")
        for session in targets:
            if quota is not None:
                session.memory_quota = quota
            if weight is not None:
                session.weight = weight
            if priority is not None:
                session.priority = priority
        log.info("admin: %s %s -> %s", "tenant" if tenant_name else "session", tenant_name or session_id, changes)
        return {"ok": True, "message": f"updated {len(targets)} session(s)", "sessions": [s.id for s in targets]}


def _failure(exc: BaseException) -> str:
    """What the log and the offending client are told when its input met a bug in the daemon."""
    return f"the daemon failed on this client's input ({type(exc).__name__}: {str(exc)[:300]})"
