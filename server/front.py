"""The daemon's front: the network, admission, tenants, the device budget and status.

The front is the daemon's small privileged process. It owns the public socket (CURVE, the
admission queue, tenants and their quotas and priorities), places sessions on devices, hands
each session to its tenant's worker (workers.py) and tells the client where that worker listens,
brokers the devices' memory between workers (broker.py), and answers STATUS and ADMIN. It never
runs a tenant's kernel and never imports torch: the clients' tensors never pass through it.

Everything the front accepts is small (:data:`~libremote_wire.messages.MAX_FRONT_MESSAGE_BYTES`:
ZeroMQ drops a peer that sends more before a byte is decoded), it is decoded by the declarations
of libremote_wire.messages, and whatever a peer sends, the front answers it or drops it and keeps
serving. A client that disconnects is forgotten at once (peers.py).

Why this module is ~600 lines: it is one state machine, the front's loop, with a handler per
message kind that reads like the protocol (HELLO, STATUS, ADMIN from clients; OPENED, REPORT,
ENDED from workers). What a handler decides lives elsewhere (admission.py, status.py, admin.py,
auth.py, policy.py, workers.py); what stays here is the order of events and the registry they
change, which splitting would scatter across files that all mutate the same state.
"""

from __future__ import annotations

import logging
import shutil
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import zmq

from libremote_wire import __version__, codec, messages
from libremote_wire.codec import ProtocolError
from libremote_wire.messages import CONTROL, Ctl, ErrorKind, Msg

from . import admin, admission, auth, limits, outbox, peers, policy, pool_agent, status
from .admission import FrontDevice, FrontSession, Waiting
from .broker import DeviceBroker, default_budget
from .policy import PolicyError, PoolConfig, Tenant
from .telemetry.collect import Telemetry
from .telemetry.config import TelemetryConfig
from .workers import WorkerPool, WorkerProcess

log = logging.getLogger("libremote.server")

_HOUSEKEEPING_S = 0.25
#: What the front takes (BATCH, PING and BYE of a session go to its worker).
_FRONT_MESSAGES = frozenset({Msg.HELLO, Msg.PING, Msg.BYE, Msg.STATUS, Msg.ADMIN})
#: What this daemon understands beyond its protocol's first release (clients check).
FEATURES = ["settings", "memory_fraction", "program_options", "generators", "workers", "device_pins", "transfers", "steps"]


class Front:
    """Serve clients on ``address`` with the devices ``--device`` names."""

    def __init__(self, address: str, device_spec: str, *, pool_config: PoolConfig | None = None,
                 max_message_bytes: int = limits.MAX_MESSAGE_BYTES, heartbeat_s: float = 2.0,
                 heartbeat_timeout_s: float = 10.0, spin_us: int = 300, keyring: auth.KeyRing | None = None,
                 auth_keys: str | None = None, server_key: str | None = None, loopback_admin: bool = False,
                 op_time_limit_s: float | None = None, worker_memory_margin: int = limits.WORKER_MEMORY_MARGIN,
                 worker_ports: tuple[int, int] | None = None, op_rules: bool = True, log_level: str = "INFO",
                 telemetry: TelemetryConfig | None = None, pool_member: pool_agent.Membership | None = None) -> None:
        self.pool = pool_config or PoolConfig()
        self.heartbeat_s = heartbeat_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.loopback_admin = loopback_admin
        self.sessions: dict[bytes, FrontSession] = {}
        self._by_id: dict[str, FrontSession] = {}
        self.waiting: list[Waiting] = []
        self._status_requests: dict[int, status.StatusRequest] = {}
        #: Per device, the totals of workers that have stopped (device time, spill traffic).
        self.retired: dict[int, dict[str, Any]] = {}
        self._next_request = 1
        self._next_housekeeping = 0.0
        #: Why the daemon takes no new sessions (``libremote admin --drain``), or None.
        self.draining: str | None = None
        self.telemetry: Telemetry | None = None
        #: With --pool: the agent that keeps this daemon registered, and HELLOs whose
        #: reservations it is checking (future, identity, info, user_id, waiter fields).
        self.pool_agent: pool_agent.PoolAgent | None = None
        self._claims: list[tuple[Any, bytes, Waiting]] = []
        self._pool_member = pool_member
        self._stop = threading.Event()
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="libremote-"))  # 0700: this user's only
        self._context = zmq.Context()
        self._control = self._context.socket(zmq.ROUTER)
        self._control.setsockopt(zmq.LINGER, 0)
        self._control.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._control.bind(f"ipc://{self.runtime_dir}/control")
        bind_host = address.rsplit(":", 1)[0] if address.startswith("tcp://") else f"ipc://{self.runtime_dir}"
        worker_config = dict(
            control=f"ipc://{self.runtime_dir}/control", bind_host=bind_host, heartbeat_s=heartbeat_s,
            heartbeat_timeout_s=heartbeat_timeout_s, idle_timeout_s=self.pool.idle_timeout_s, spin_us=spin_us,
            max_message_bytes=max_message_bytes, max_handles=self.pool.max_handles, cuda_graphs=self.pool.cuda_graphs,
            graph_compiler=self.pool.graph_compiler, residency=self.pool.manages_residency, op_rules=op_rules,
            auth_keys=auth_keys, server_key=server_key, port_range=list(worker_ports) if worker_ports else None,
        )
        try:
            self.workers = WorkerPool(self.runtime_dir, self._control, worker_config, op_time_limit_s=op_time_limit_s,
                                      memory_margin=worker_memory_margin, on_exit=self._worker_exited)
            specs, facts, self.torch_version = self.workers.start(device_spec, log_level)
            self.devices = [FrontDevice(index, spec, fact) for index, (spec, fact) in enumerate(zip(specs, facts))]
            if self.pool.manages_residency:
                for device in self.devices:
                    budget = self.pool.device_memory or default_budget(device.spec, device.total_memory)
                    device.broker = DeviceBroker(device.index, budget, self.pool.host_spill, self._priority_on)
            self._socket = self._context.socket(zmq.ROUTER)
            self._socket.setsockopt(zmq.LINGER, 0)
            # Everything the front takes is small: a larger message disconnects its sender before
            # a byte of it is decoded (messages.MAX_FRONT_MESSAGE_BYTES).
            self._socket.setsockopt(zmq.MAXMSGSIZE, messages.MAX_FRONT_MESSAGE_BYTES)
            outbox.configure(self._socket)
            self._outbox = outbox.Outbox(self._socket, self._on_outbox_full)
            self._socket.setsockopt(zmq.HEARTBEAT_IVL, int(heartbeat_s * 1000))
            self._socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(heartbeat_s * 3000))
            limits.bound_connections(self._socket)
            self._peers = peers.Peers(self._socket, per_address=limits.CONNECTIONS_PER_ADDRESS)
            self._authenticator = auth.secure(self._socket, keyring) if keyring is not None else None
            if address.endswith(":0"):
                port = self._socket.bind_to_random_port(address.rsplit(":", 1)[0])
                address = f"{address.rsplit(':', 1)[0]}:{port}"
            else:
                self._socket.bind(address)
            self.address = self._socket.getsockopt_string(zmq.LAST_ENDPOINT) or address
            # Health sampling, the counters, and (--metrics-listen) the HTTP endpoint: telemetry/.
            self.telemetry = Telemetry(self, telemetry or TelemetryConfig(), self.workers.hardware)
            self.telemetry.start()
            if pool_member is not None:
                self.pool_agent, self.pool_id, self.pool_advertise = pool_member.agent(self.address)
                self.pool_agent.start(self._pool_record())
        except BaseException:
            self._close()
            raise

    # ------------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to finish (safe from a signal handler or another thread)."""
        self._stop.set()

    def serve_forever(self) -> None:
        names = ", ".join(f"{device.spec} ({device.name})" for device in self.devices)
        log.info("libremote-server %s listening on %s, executing on %s, torch %s, protocol %d (a worker process per "
                 "tenant)", __version__, self.address, names, self.torch_version, messages.PROTOCOL_VERSION)
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._control, zmq.POLLIN)
        poller.register(self.workers.zygote_fd, zmq.POLLIN)
        poller.register(self._peers.monitor, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(50))
                if self._socket in ready:
                    for _ in range(256):
                        try:
                            frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._on_message(frames)
                if self._control in ready:
                    for _ in range(256):
                        try:
                            control = self._control.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._on_control(control)
                if self.workers.zygote_fd in ready:
                    self.workers.on_zygote()
                    if self.workers.zygote_fd < 0:
                        poller.unregister(self.workers.zygote_fd)
                for identity in self._peers.closed():
                    self._front_connection_closed(identity)
                if self._claims:
                    self._on_claims()
                self._housekeeping()
        finally:
            self._close()
            log.info("libremote-server stopped")

    def _close(self) -> None:
        if self.pool_agent is not None:
            self.pool_agent.stop()  # leave the pool first: no client is placed here from now on
        if self.telemetry is not None:
            self.telemetry.stop()
        for session in list(self.sessions.values()):
            self._tell(session.identity, "the daemon is stopping")
        if getattr(self, "workers", None) is not None:
            self.workers.stop()
        authenticator = getattr(self, "_authenticator", None)
        if authenticator is not None:
            authenticator.stop()
        self._context.destroy(linger=0)
        shutil.rmtree(self.runtime_dir, ignore_errors=True)

    # ------------------------------------------------------------------------------------------
    # Messages from clients and the libremote command
    # ------------------------------------------------------------------------------------------
    def _on_message(self, frames: list[zmq.Frame]) -> None:
        """Handle one message. A malformed one is answered with a protocol error; whatever it
        holds, only its sender is affected."""
        identity = frames[0].bytes
        if len(frames) > 1:
            self._peers.seen(identity, frames[1])
        user_id = auth.user_id_of(frames[0]) if self._authenticator is not None else None
        header: Any = None
        try:
            codec.check(len(frames) == 2, "the front takes single-frame messages (tensor data goes to workers)")
            header = codec.unpackb(frames[1].buffer, max_bytes=messages.MAX_FRONT_MESSAGE_BYTES)
            if type(header) is list and header and header[0] == Msg.BATCH:
                self._counters.message("batch")
                self._batch_to_front(identity, messages.MESSAGES[Msg.BATCH].parse(header))
                return
            kind, fields = messages.parse(header, messages.MESSAGES, accepted=_FRONT_MESSAGES, at="the daemon's front")
            self._counters.message(kind.name.lower())
            if user_id is not None and kind in (Msg.HELLO, Msg.PING, Msg.BYE) and self._held_by_another(identity, user_id):
                self._counters.reject("other_owner")
                self._refuse(identity, "this connection's routing id belongs to a session opened with another key; "
                                       "use a fresh random routing id (the libremote client does)")
            elif kind == Msg.HELLO:
                try:
                    info = messages.HELLO_INFO.parse(fields[0], where="HELLO")
                except ProtocolError as exc:
                    self._refuse(identity, f"malformed HELLO: {exc}")
                    return
                self._on_hello(identity, info, user_id)
            elif kind == Msg.PING:
                for waiter in self.waiting:
                    if waiter.identity == identity:
                        waiter.last_seen = time.monotonic()
            elif kind == Msg.BYE:
                self._forget_client(identity, "client said goodbye")
            elif kind == Msg.STATUS:
                try:
                    credentials = messages.STATUS_CREDENTIALS.parse(fields[0], where="STATUS") if fields[0] else {}
                except ProtocolError as exc:
                    self._refuse(identity, str(exc))
                    return
                self._on_status(identity, credentials, user_id, _peer_address(frames[1]))
            elif kind == Msg.ADMIN:
                try:
                    request = messages.ADMIN_REQUEST.parse(fields[0], where="ADMIN")
                    answer = self._on_admin(request, user_id, _peer_address(frames[1]))
                except ProtocolError as exc:
                    answer = {"ok": False, "message": str(exc)}
                self._send(identity, [Msg.ADMIN, answer])
        except ProtocolError as exc:
            self._counters.reject("malformed")
            log.warning("malformed message from peer %s: %s", identity.hex()[:12], exc,
                        extra={"event": "security_rejection", "reason": "malformed"})
            self._send(identity, [Msg.REPLY, messages.batch_seq(header), [], [ErrorKind.PROTOCOL.value, "", str(exc)]])
        except Exception as exc:  # a bug met by this input: its sender pays, nobody else
            self._counters.reject("failure")
            log.error("peer %s: the front failed on its message", identity.hex()[:12], exc_info=exc,
                      extra={"event": "security_rejection", "reason": "failure"})
            self._send(identity, [Msg.REPLY, None, [], [ErrorKind.PROTOCOL.value, "",
                                                         f"the daemon failed on this message ({type(exc).__name__})"]])

    def _batch_to_front(self, identity: bytes, fields: list[Any]) -> None:
        """A BATCH belongs to a session's worker; at the front, the sender has none here (it said
        no HELLO, its session ended, or it predates protocol 2). A batch that asks is told so."""
        seq, _, want_reply = fields[:3]  # (a striped BATCH has a fourth field)
        if want_reply:
            why = ("this client's session ended: reconnect" if identity in self.sessions else
                   "this daemon has no session for the client (say HELLO first; once welcomed, BATCH goes to the "
                   "worker WELCOME names, which libremote clients of this release do); reconnect")
            self._send(identity, [Msg.REPLY, seq, [], [ErrorKind.SESSION.value, "", why]])

    def _front_connection_closed(self, identity: bytes) -> None:
        """A client's connection to the front closed. Waiting, or not yet told where its worker
        is, it is gone; with a session at its worker, that worker sees its own connection close
        (or its BYE, which may still be on its way there) and ends the session itself."""
        session = self.sessions.get(identity)
        if session is not None and session.opened:
            self.waiting = [w for w in self.waiting if w.identity != identity]
            self._peers.forget(identity)
            return
        self._forget_client(identity, "its client disconnected (exited, was killed, or closed the connection)")

    def _forget_client(self, identity: bytes, why: str) -> None:
        """A client is gone (BYE or disconnected): out of the queue, and its session closed."""
        self.waiting = [w for w in self.waiting if w.identity != identity]
        self._peers.forget(identity)
        session = self.sessions.get(identity)
        if session is not None:
            self.workers.send(session.worker, [Ctl.CLOSE, session.id, why])
            self._remove_session(session, why)

    def _send(self, identity: bytes, header: list[Any]) -> None:
        self._outbox.send(identity, [codec.packb(header)])

    def _refuse(self, identity: bytes, reason: str, *, tenant: str | None = None, why: str = "other",
                request: str = "", kind: str | None = None) -> None:
        """Refuse a client (REFUSED says why); ``why`` is the reason's kind for the metrics
        (telemetry/metrics.py REFUSAL_REASONS), and REFUSED's ``kind`` unless ``kind`` is finer
        (``reservation``: a client placed through the pool tells a stale placement, which it
        places again, from a refusal that placing again cannot cure)."""
        self._counters.refused(tenant, why)
        log.warning("refused %s: %s", identity.hex()[:12], reason,
                    extra={"event": "refusal", "reason": why, "tenant": tenant, "request": request or None})
        self._send(identity, [Msg.REFUSED, reason, kind or why])

    @property
    def _counters(self) -> Any:
        return self.telemetry.counters  # type: ignore[union-attr]

    def _tell(self, identity: bytes, why: str) -> None:
        """Tell an admitted client its session ended (it raises this at its next wait)."""
        self._send(identity, [Msg.REPLY, None, [], [ErrorKind.SESSION.value, "", why]])

    def _on_outbox_full(self, identity: bytes) -> None:
        self._forget_client(identity, f"its client did not read its messages ({limits.OUTBOX_MESSAGES} were waiting)")

    def _held_by_another(self, identity: bytes, user_id: str | None) -> bool:
        """Whether ``identity`` (a routing id) has a session or queue place opened by another
        authenticated identity: a peer that reconnected with a dropped client's routing id."""
        session = self.sessions.get(identity)
        owners = ([session.owner] if session is not None else []) + [w.owner for w in self.waiting if w.identity == identity]
        return any(not auth.same_owner(owner, user_id) for owner in owners)

    # ------------------------------------------------------------------------------------------
    # Admission: HELLO, the queue, placement, the worker
    # ------------------------------------------------------------------------------------------
    def _on_hello(self, identity: bytes, info: dict[str, Any], user_id: str | None) -> None:
        request = uuid.uuid4().hex[:12]
        self._counters.hello(info)
        if info.get("protocol") != messages.PROTOCOL_VERSION:
            self._refuse(identity, (
                f"protocol mismatch: the client speaks libremote protocol {info.get('protocol')} "
                f"(libremote {info.get('libremote')}), this daemon speaks {messages.PROTOCOL_VERSION} "
                f"(libremote {__version__}); install the same libremote release on both sides"),
                why="protocol", request=request)
            return
        try:
            tenant = (self.pool.tenant_of_key(auth.Identity.from_user_id(user_id)) if user_id is not None
                      else self.pool.authenticate(info.get("tenant"), info.get("token")))
            if not any(tenant.allows_device(device.name) for device in self.devices):
                raise PolicyError(f"tenant {tenant.name!r} may use {tenant.device_names}, and this daemon has "
                                  f"{[device.name for device in self.devices]}")
            priority = admission.admitted_priority(self.pool, tenant, info.get("priority"))
            device_count = admission.requested_devices(info, tenant, self.devices)
        except PolicyError as exc:
            self._refuse(identity, str(exc), why="policy", request=request)
            return
        if self.draining:
            self._refuse(identity, f"this daemon is draining ({self.draining}) and takes no new sessions; use another "
                                   "daemon of the pool, or try later", tenant=tenant.name, why="draining", request=request)
            return
        unhealthy = admission.unhealthy_reason(self.devices, tenant, device_count, info.get("device_indices"))
        if unhealthy:
            self._refuse(identity, f"no healthy device can take this session: {unhealthy}; use another daemon of the "
                                   "pool, or ask its operator", tenant=tenant.name, why="unhealthy", request=request)
            return
        if identity in self.sessions:
            self._forget_client(identity, "client said hello again")
        self.waiting = [w for w in self.waiting if w.identity != identity]
        if self.pool.oversubscribe is not None and not any(
                tenant.allows_device(device.name) and admission.quota_fits(self.pool, device, tenant.memory_quota, alone=True)
                for device in self.devices):
            self._refuse(identity, f"tenant {tenant.name!r}'s memory quota ({tenant.memory_quota} bytes) is more "
                                   f"than --oversubscribe {self.pool.oversubscribe:g} lets any device admit",
                         tenant=tenant.name, why="quota", request=request)
            return
        authenticated = user_id is not None or self.pool.has_tenants
        waiter = Waiting(identity, info, tenant, priority, device_count, owner=user_id, authenticated=authenticated,
                         request=request)
        if self.pool_agent is not None:
            token = info.get("reservation")
            if not token:
                self._refuse(identity, f"this daemon belongs to the pool {self.pool_agent.address} and serves only "
                                       "clients placed through it: set LIBREMOTE_SERVER to that etcd:// address (or "
                                       "pass it to libremote.connect)", tenant=tenant.name, why="policy", request=request)
                return
            if len(self._claims) >= limits.MAX_WAITING:  # (each check is an etcd read: bounded)
                self._refuse(identity, f"{limits.MAX_WAITING} pool reservations are being checked already; try later",
                             tenant=tenant.name, why="queue_full", request=request)
                return
            self._claims.append((self.pool_agent.verify(token, tenant.name), identity, waiter))
            return
        self._admit_or_queue(waiter)

    def _on_claims(self) -> None:
        """HELLOs whose pool reservations were checked: admit on the reserved devices, or refuse."""
        pending = []
        for future, identity, waiter in self._claims:
            if not future.done():
                pending.append((future, identity, waiter))
                continue
            try:
                reservation = future.result()
            except Exception as exc:  # ClaimRefused, EtcdUnavailable
                self._refuse(identity, f"the pool's reservation does not hold: {exc}", tenant=waiter.tenant.name,
                             why="policy", request=waiter.request, kind="reservation")
                continue
            if waiter.identity in self.sessions:
                continue
            asked = waiter.info.get("device_indices")
            if asked is not None and list(asked) != list(reservation.devices):
                # (A client pins the devices its placement named: a mismatch is a client bug or a
                # token used for other devices; serve only what the pool reserved here.)
                self._refuse(identity, f"this HELLO asks for devices {list(asked)} but reservation {reservation.rid} "
                                       f"holds {list(reservation.devices)} here; connect through the pool address again",
                             tenant=waiter.tenant.name, why="policy", request=waiter.request)
                continue
            waiter.pinned = tuple(reservation.devices)
            waiter.device_count = len(reservation.devices)
            waiter.memory_quota = min(waiter.tenant.memory_quota, reservation.memory) if reservation.memory else None
            if admission.reserved_devices(self.devices, waiter.pinned) is None:
                self._refuse(identity, f"reservation {reservation.rid} names devices {list(reservation.devices)}, which "
                                       "this daemon cannot give now (unhealthy or absent); connect through the pool again",
                             tenant=waiter.tenant.name, why="unhealthy", request=waiter.request)
                continue
            self._admit_or_queue(waiter)
        self._claims = pending

    def _pool_record(self) -> Any:
        assert self._pool_member is not None
        return pool_agent.build_record(self, daemon_id=self.pool_id, node=self._pool_member.node,
                                       advertise=self.pool_advertise)

    def _admit_or_queue(self, waiter: Waiting) -> None:
        identity, tenant, request, info = waiter.identity, waiter.tenant, waiter.request, waiter.info
        if not self._admit(waiter):
            if len(self.waiting) >= limits.MAX_WAITING:
                self._refuse(identity, f"the admission queue is full ({limits.MAX_WAITING} clients wait); try later",
                             tenant=tenant.name, why="queue_full", request=request)
                return
            self.waiting.append(waiter)
            self._counters.admission(tenant.name, "queued")
            position = self._queue_position(waiter)
            reason = self._why_waiting(waiter)
            log.info("client pid %s (tenant %s) queued at position %d: %s", info.get("pid"), tenant.name, position, reason,
                     extra={"event": "queued", "tenant": tenant.name, "request": request, "position": position})
            self._send(identity, [Msg.QUEUED, {"position": position, "heartbeat_s": self.heartbeat_s, "reason": reason}])

    def _why_waiting(self, waiter: Waiting) -> str:
        if self._tenant_full(waiter):
            return (f"tenant {waiter.tenant.name!r} has its most sessions open at once "
                    f"({self._session_cap(waiter.tenant)}, --max-sessions-per-tenant)")
        if admission.devices_full(self.pool, self.devices, waiter.tenant):
            return "every device has its maximum number of sessions (--max-sessions)"
        return "admitting it would commit more memory than --oversubscribe allows"

    def _session_cap(self, tenant: Tenant) -> int:
        return tenant.max_sessions or self.pool.max_sessions_per_tenant

    def _tenant_full(self, waiter: Waiting) -> bool:
        if not waiter.authenticated:
            return False  # (anonymous clients cannot be told apart: --max-sessions bounds them)
        open_now = sum(1 for s in self.sessions.values() if s.tenant.name == waiter.tenant.name)
        return open_now >= self._session_cap(waiter.tenant)

    def _admit(self, waiter: Waiting) -> bool:
        if self._tenant_full(waiter):
            return False
        placed = (admission.reserved_devices(self.devices, waiter.pinned) if waiter.pinned is not None
                  else admission.place(self.pool, self.devices, waiter.tenant, waiter.device_count,
                                       pinned=waiter.info.get("device_indices")))
        if placed is None:
            return False
        session_id = uuid.uuid4().hex[:12]
        key = waiter.tenant.name if waiter.authenticated else f"session:{session_id}"
        worker = self.workers.worker_for(key, waiter.tenant, waiter.priority)
        session = FrontSession(session_id, waiter.identity, waiter.owner, waiter.tenant, waiter.priority,
                               waiter.tenant.weight, waiter.memory_quota or waiter.tenant.memory_quota, placed, worker,
                               waiter.info,
                               request=waiter.request)
        self._counters.admission(waiter.tenant.name, "admitted", waited_s=time.monotonic() - waiter.since)
        for device in placed:
            device.sessions.append(session)
        worker.sessions.add(session.id)
        self.sessions[waiter.identity] = session
        self._by_id[session.id] = session
        self.workers.send(worker, [Ctl.OPEN, {
            "session": session.id, "routing_id": waiter.identity, "owner": waiter.owner,
            "devices": [device.index for device in placed], "tenant": waiter.tenant.name,
            "priority": waiter.priority, "weight": session.weight, "memory_quota": session.memory_quota,
            "tenant_quota": waiter.tenant.memory_quota, "client": waiter.info,
        }])
        return True

    def _on_opened(self, worker: WorkerProcess, session_id: str, error: str | None) -> None:
        session = self._by_id.get(session_id)
        if session is None or session.worker is not worker:
            return
        if error:
            self._refuse(session.identity, error, tenant=session.tenant.name, request=session.request)
            self._remove_session(session, error)
            return
        session.opened = True
        info = session.info
        log.info("session %s opened on %s in worker %s (pid %s): tenant %s, priority %s, pid %s on %s, torch %s",
                 session.id, ", ".join(f"{d.index}:{d.spec}" for d in session.devices), worker.id, worker.pid,
                 session.tenant.name, session.priority, info.get("pid"), info.get("host"), info.get("torch"),
                 extra={"event": "admission", "session": session.id, "tenant": session.tenant.name,
                        "request": session.request, "worker": worker.id, "devices": [d.index for d in session.devices],
                        "priority": session.priority, "client_pid": info.get("pid"), "client_host": info.get("host")})
        port = worker.endpoint.rsplit(":", 1)[1] if worker.endpoint and worker.endpoint.startswith("tcp://") else None
        self._send(session.identity, [Msg.WELCOME, {
            "session": session.id,
            "protocol": messages.PROTOCOL_VERSION,
            "features": FEATURES + (["stripes"] if self._authenticator is not None else []),
            "worker": worker.endpoint,
            **({"worker_port": int(port)} if port is not None else {}),
            "libremote": __version__,
            "torch": self.torch_version,
            "host": socket.gethostname(),
            "pid": worker.pid,
            "devices": [device.facts for device in session.devices],
            "heartbeat_s": self.heartbeat_s,
            "tenant": session.tenant.name,
            "priority": session.priority,
            "memory_quota": session.memory_quota,
        }])

    def _queue_position(self, waiter: Waiting) -> int:
        return sorted(self.waiting, key=admission.queue_order).index(waiter) + 1

    def _remove_session(self, session: FrontSession, why: str) -> None:
        if self.sessions.get(session.identity) is session:
            del self.sessions[session.identity]
        self._by_id.pop(session.id, None)
        for device in session.devices:
            if session in device.sessions:
                device.sessions.remove(session)
        session.worker.sessions.discard(session.id)
        self._counters.session_ended(session)
        log.info("session %s ended: %s", session.id, why,
                 extra={"event": "session_end", "session": session.id, "tenant": session.tenant.name, "why": why,
                        "request": session.request})

    def _worker_exited(self, worker: WorkerProcess, why: str) -> None:
        """A worker died (crash, killed): its sessions end; the clients are told why; the next
        session of its tenant gets a fresh worker. Nobody else notices."""
        for session in [s for s in self.sessions.values() if s.worker is worker]:
            message = (f"{why}. The session was closed (its tensors are gone); other tenants were not affected. "
                       "Call libremote.connect() to start a new session.")
            if session.opened:
                self._tell(session.identity, message)
            else:
                self._refuse(session.identity, message, tenant=session.tenant.name, request=session.request)
            log.warning("session %s (tenant %s) lost with its worker %s: %s", session.id, session.tenant.name, worker.id,
                        why, extra={"event": "eviction", "session": session.id, "tenant": session.tenant.name,
                                    "worker": worker.id, "reason": "worker_exited"})
            self._remove_session(session, why)
        for device in self.devices:
            if device.broker is not None:
                self._send_control(device.broker.drop(worker.id))
        for request in list(self._status_requests.values()):
            request.awaiting.discard(worker.id)

    # ------------------------------------------------------------------------------------------
    # Control messages from workers
    # ------------------------------------------------------------------------------------------
    def _on_control(self, frames: list[bytes]) -> None:
        """A message from a worker. Workers run tenants' code, so what they say is checked like
        any peer's input: a worker can only speak for itself, and a malformed message is dropped."""
        worker = self.workers.by_routing_id(frames[0])
        if worker is None or len(frames) != 2:
            return
        try:
            kind, fields = messages.parse(codec.unpackb(frames[1], max_bytes=1 << 20), CONTROL)
            if kind == Ctl.READY:
                self.workers.ready(worker, fields[0])
            elif kind == Ctl.OPENED:
                self._on_opened(worker, fields[0], fields[1])
            elif kind == Ctl.ENDED:
                session = self._by_id.get(fields[0])
                if session is not None and session.worker is worker:
                    if fields[3]:
                        self._tell(session.identity, fields[3])
                    if fields[4]:  # (its final counters: the tenant's totals keep them)
                        session.stats = {**session.stats, **fields[4]}
                    self._remove_session(session, fields[1])
            elif kind == Ctl.REPORT:
                self._on_report(worker, fields[0], fields[1] or {})
            elif kind in (Ctl.WANT, Ctl.SHRUNK):
                device = self.devices[fields[0]] if 0 <= fields[0] < len(self.devices) else None
                if device is not None and device.broker is not None:
                    if kind == Ctl.WANT:
                        self._send_control(device.broker.want(worker.id, fields[1], fields[2], fields[3], fields[4]))
                    else:
                        self._send_control(device.broker.shrunk(worker.id, fields[1], fields[2]))
        except ProtocolError as exc:
            log.error("worker %s sent a malformed control message: %s", worker.id, exc)

    def _send_control(self, outgoing: list[tuple[str, list[Any]]]) -> None:
        for worker_id, header in outgoing:
            worker = self.workers.workers.get(worker_id)
            if worker is not None:
                self.workers.send(worker, header)

    def _priority_on(self, worker_id: str, device_index: int) -> str:
        """A worker's highest session priority on a device (for the broker's order)."""
        best = "low"
        for session in self.sessions.values():
            if session.worker.id == worker_id and any(d.index == device_index for d in session.devices):
                if policy.PRIORITIES[session.priority] > policy.PRIORITIES[best]:
                    best = session.priority
        return best

    # ------------------------------------------------------------------------------------------
    # Housekeeping: the queue, workers, leases, status answers
    # ------------------------------------------------------------------------------------------
    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now < self._next_housekeeping:
            return
        self._next_housekeeping = now + _HOUSEKEEPING_S
        self.waiting = [w for w in self.waiting if now - w.last_seen <= self.heartbeat_timeout_s]
        for waiter in sorted(self.waiting, key=admission.queue_order):
            if self._admit(waiter):
                self.waiting.remove(waiter)
        self.workers.housekeeping(now)
        if self.pool_agent is not None:  # (every turn: a drain or an unhealthy device reaches the pool at once;
            self.pool_agent.update(self._pool_record())  # the agent writes only what changed)
        if self.telemetry is not None and self.telemetry.housekeeping(now):
            self._ask_reports(None, auth.Requester(is_admin=True))
        for device in self.devices:
            if device.broker is not None:
                self._send_control(device.broker.tick(now))
        for request_id, request in list(self._status_requests.items()):
            if not request.awaiting or now - request.started > status.STATUS_TIMEOUT_S:
                self._finish_status(request_id)

    # ------------------------------------------------------------------------------------------
    # Status and live changes
    # ------------------------------------------------------------------------------------------
    def _on_status(self, identity: bytes, credentials: dict[str, Any], user_id: str | None, peer: str | None) -> None:
        viewer = auth.requester(self.pool, user_id, credentials, peer, loopback_admin=self.loopback_admin)
        if viewer.refusal:
            self._send(identity, [Msg.REFUSED, viewer.refusal])
            return
        self._ask_reports(identity, viewer)

    def _ask_reports(self, identity: bytes | None, viewer: auth.Requester) -> None:
        """Ask every worker for its figures; once all answered, the report goes to ``identity``
        (STATUS), or with None, to the telemetry's snapshot (metrics, dashboard)."""
        request_id = self._next_request
        self._next_request += 1
        ready = {worker.id for worker in self.workers.workers.values() if worker.ready}
        self._status_requests[request_id] = status.StatusRequest(identity or b"", viewer, set(ready))
        for worker_id in ready:
            self.workers.send(self.workers.workers[worker_id], [Ctl.REPORT, request_id])
        if not ready:
            self._finish_status(request_id)

    def _on_report(self, worker: WorkerProcess, request_id: int, report: dict[str, Any]) -> None:
        if request_id == 0:  # a stopping worker's last word: its totals go on counting in status
            status.retire(self.retired, report)
            return
        request = self._status_requests.get(request_id)
        if request is None or worker.id not in request.awaiting:
            return
        request.awaiting.discard(worker.id)
        request.reports[worker.id] = report
        for row in report.get("sessions", ()):
            session = self._by_id.get(str(row.get("session"))) if isinstance(row, dict) else None
            if session is not None and session.worker is worker:
                session.stats = row
        if not request.awaiting:
            self._finish_status(request_id)

    def _finish_status(self, request_id: int) -> None:
        request = self._status_requests.pop(request_id)
        report = self.status(request.reports)
        if not request.identity:
            if self.telemetry is not None:
                self.telemetry.publish(report, request.reports)
            return
        self._send(request.identity, [Msg.STATUS, auth.visible_status(report, request.viewer)])

    def status(self, reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The report ``libremote status`` shows (status.py)."""
        return status.report(self, reports)

    def _on_admin(self, request: dict[str, Any], user_id: str | None, peer: str | None) -> dict[str, Any]:
        viewer = auth.requester(self.pool, user_id, request, peer, loopback_admin=self.loopback_admin)
        if not viewer.is_admin:
            return {"ok": False, "message": viewer.refusal or auth.admin_refusal(viewer, curve=user_id is not None)}
        try:
            return self._apply_admin(request)
        except PolicyError as exc:
            return {"ok": False, "message": str(exc)}

    def _apply_admin(self, request: dict[str, Any]) -> dict[str, Any]:
        return admin.apply(self, request)


def _peer_address(frame: zmq.Frame) -> str | None:
    """The IP address a message came from (ZeroMQ's ``Peer-Address`` property)."""
    address = frame.get("Peer-Address")
    return address if isinstance(address, str) else None
