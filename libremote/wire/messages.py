"""Every message of libremote's wire, declared once: its fields, their types and their bounds.

Three kinds of peer speak it (docs/ARCHITECTURE.md):

- a **client** says HELLO to the daemon's **front**, which admits it (WELCOME, QUEUED, REFUSED)
  and names the **worker** process that will run its session. The client then sends its BATCHes
  of commands straight to that worker, which answers with REPLYs;
- the **front** and its **workers** talk over a private control socket (:class:`Ctl` messages):
  sessions opened and closed, memory leases, reports;
- the ``libremote`` command asks the front for STATUS and sends ADMIN changes.

The declarations below (:data:`MESSAGES`, :data:`CONTROL`, :data:`COMMANDS` and the records
inside them) are what the peers decode with: :meth:`Message.parse` refuses a header whose fields
have the wrong type or break a bound, and :meth:`Record.parse` (which the receiver calls on a
map-typed field, deciding what a bad one means) keeps only the declared keys of a map, checked.
``python -m libremote_wire.messages`` prints them as docs/PROTOCOL.md (a test fails when that
file is stale).

Commands inside a BATCH run once per op, so the worker does not parse them through
:meth:`Message.parse` (that would cost more than the op's own bookkeeping); their declarations
document them, and each worker handler checks its own fields where it first uses them.
"""

from __future__ import annotations

import enum
import sys
from dataclasses import dataclass, field
from typing import Any

from .codec import Opaque, ProtocolError, check

#: Bumped whenever a message changes meaning. 2: WELCOME names the worker that runs the session;
#: BATCH, PING and BYE go there.
PROTOCOL_VERSION = 2

#: CPU tensors up to this size travel inside the header (op arguments such as a 0-dim scalar).
INLINE_TENSOR_BYTES = 64 << 10

#: Backpressure for streamed batches (those that ask for no reply). The client asks for a reply,
#: an acknowledgement, on a batch at least every STREAM_WINDOW_BATCHES batches or
#: STREAM_WINDOW_BYTES bytes of frames, and before it asks again it waits for the previous
#: acknowledgement: at most two windows are ever on the wire or queued on the worker. The worker
#: holds clients to a multiple of this (libremote_server/limits.py) and ends the session of one
#: that streams further without asking.
STREAM_WINDOW_BATCHES = 64
STREAM_WINDOW_BYTES = 64 << 20

#: Largest message the front accepts (ZeroMQ disconnects a peer that sends a larger one before a
#: byte of it is decoded). Everything the front takes is small: HELLO, PING, BYE, STATUS, ADMIN;
#: tensor data goes to workers. So an unauthenticated peer can make the front hold at most this
#: much per message, decoded into a bounded number of objects.
MAX_FRONT_MESSAGE_BYTES = 64 << 10

#: Cross-server copies (EXPORT, PULL; libremote/client/transfer.py). A worker exports a snapshot of
#: a tensor's bytes under a random token of EXPORT_TOKEN_BYTES that only the exporting session's
#: client learns; another daemon's worker of the same program pulls it once, in PULL_CHUNK_BYTES
#: pieces, within EXPORT_TTL_S. A session holds at most MAX_EXPORTS unpulled exports of at most
#: MAX_EXPORT_BYTES together (host memory of the exporting worker).
EXPORT_TOKEN_BYTES = 32
PULL_CHUNK_BYTES = 8 << 20
EXPORT_TTL_S = 60.0
MAX_EXPORTS = 16
MAX_EXPORT_BYTES = 4 << 30
#: Longest peer worker address a PULL may name (tcp://host:port).
MAX_PEER_ADDRESS = 256

#: Striped bulk transfer under CURVE (libremote/client/stripes.py, server/worker/stripes.py). ZeroMQ
#: encrypts one connection in one I/O thread, so one connection moves CURVE data at one core's
#: speed. A client of a daemon with the "stripes" feature opens up to MAX_STRIPES more connections
#: to its worker (STRIPE, same key as the session), and a frame of at least STRIPE_MIN_BYTES in a
#: BATCH or REPLY travels as CHUNKs of STRIPE_CHUNK_BYTES spread over them; the message itself
#: goes on the session's connection as before, with an empty frame in its place and a "striped"
#: entry saying which transfer fills it. Small messages never touch the stripes.
MAX_STRIPES = 8
STRIPE_MIN_BYTES = 1 << 20
STRIPE_CHUNK_BYTES = 512 << 10


class Msg(enum.IntEnum):
    """Messages between a client (or the ``libremote`` command) and the daemon."""

    HELLO = 1
    WELCOME = 2
    REFUSED = 3
    BATCH = 4
    REPLY = 5
    BYE = 6
    PING = 7
    QUEUED = 8
    STATUS = 9
    ADMIN = 10
    PULL = 11
    PULLED = 12
    STRIPE = 13
    CHUNK = 14


class Cmd(enum.IntEnum):
    """Commands inside a BATCH."""

    OP = 0
    OP_SYNC = 1
    UPLOAD = 2
    FETCH = 3
    FREE = 4
    SYNC = 5
    SEED = 6
    RNG_STATE = 7
    EVENT = 8
    ELAPSED = 9
    QUERY = 10
    PUT = 11
    GRAPH = 12
    RUN_GRAPH = 13
    PROGRAM = 14
    REPLAY = 15
    SETTINGS = 16
    GENERATOR = 17
    EXPORT = 18
    PULL = 19
    STEP = 20
    RUN_STEP = 21


class Ctl(enum.IntEnum):
    """Control messages between the front and a worker (never seen by clients)."""

    READY = 1
    OPEN = 2
    OPENED = 3
    CLOSE = 4
    ENDED = 5
    UPDATE = 6
    REPORT = 7
    WANT = 8
    GRANT = 9
    SHRINK = 10
    SHRUNK = 11
    STOP = 12


#: Commands whose execution yields an entry in REPLY.results.
RESULT_COMMANDS = frozenset({Cmd.OP_SYNC, Cmd.FETCH, Cmd.SYNC, Cmd.RNG_STATE, Cmd.ELAPSED, Cmd.QUERY, Cmd.EXPORT})


class ErrorKind(str, enum.Enum):
    """What went wrong, as a worker reports it in REPLY.error = [kind, op, message]."""

    OP = "op"  # the op itself raised (bad arguments that local inference could not catch, ...)
    OOM = "oom"  # out of device memory or over the quota
    REFUSED = "refused"  # the op is not on the worker's allowlist
    HANDLE = "handle"  # a handle that this session does not own (or that a failed op never made)
    PROTOCOL = "protocol"  # a malformed message
    SESSION = "session"  # the daemon does not know this session (restarted, reclaimed, worker died)


# ----------------------------------------------------------------------------------------------
# Declarations
# ----------------------------------------------------------------------------------------------
ANY = object()  #: a field type: any value (checked where it is used)
NUMBER = (int, float)
_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "text", bytes: "bytes",
               list: "a list", dict: "a map", type(None): "nil", Opaque: "an extension value"}


def _words(kind: type) -> str:
    return _TYPE_WORDS.get(kind, kind.__name__)


@dataclass(frozen=True)
class Field:
    """One field: a position in a message's array or a key of a :class:`Record`."""

    name: str
    type: Any  # a Python type, a tuple of them, a Record, or ANY
    doc: str
    #: Longest accepted: characters of text, bytes, entries of an array or map (0: the codec's).
    bound: int = 0
    optional: bool = False  # may be nil, or (at the end of a message) absent

    def check(self, value: Any, where: str) -> Any:
        """``value`` if it has this field's type and bounds (a Record: its parsed copy)."""
        if value is None and self.optional:
            return None
        expected = self.type
        if isinstance(expected, Record):
            # (Only its type here: the receiver parses the record itself, and decides what a bad
            # field means: HELLO's is REFUSED with the reason, ADMIN's answered {ok: false}.)
            check(type(value) is dict, lambda: f"{where} {self.name} must be a map, not {_words(type(value))}")
            return value
        if expected is ANY:
            return value
        kinds = expected if isinstance(expected, tuple) else (expected,)
        # type(), not isinstance: True is not an integer here, and subclasses never come off the wire.
        if type(value) not in kinds and not (float in kinds and type(value) is int):
            raise ProtocolError(f"{where} {self.name} must be {self.type_words()}, not {_words(type(value))}")
        if self.bound and type(value) in (str, bytes, list, dict) and len(value) > self.bound:
            unit = "characters" if type(value) is str else "entries" if type(value) in (list, dict) else "bytes"
            raise ProtocolError(f"{where} {self.name} holds {len(value)} {unit}; at most {self.bound} are accepted")
        return value

    def type_words(self) -> str:
        if isinstance(self.type, Record):
            return f"a map ({self.type.name})"
        if self.type is ANY:
            return "any value"
        kinds = self.type if isinstance(self.type, tuple) else (self.type,)
        return " or ".join(_TYPE_WORDS.get(kind, kind.__name__) for kind in kinds)


@dataclass(frozen=True)
class Record:
    """A map with declared keys. Unknown keys are dropped; a declared one that is nil is left out."""

    name: str
    doc: str
    fields: tuple[Field, ...]

    def parse(self, value: dict[Any, Any], *, where: str | None = None) -> dict[str, Any]:
        where = where or self.name
        kept: dict[str, Any] = {}
        for spec in self.fields:
            item = value.get(spec.name)
            if item is None:
                if not spec.optional:
                    raise ProtocolError(f"{where} needs {spec.name}")
                continue
            kept[spec.name] = spec.check(item, where)
        return kept


@dataclass(frozen=True)
class Message:
    """A header: ``[kind, field, field, ...]``; optional fields may be left off at the end."""

    kind: enum.IntEnum
    sender: str  # who sends it: "client", "front", "worker", "admin tool" (several: "client, front")
    doc: str
    fields: tuple[Field, ...] = ()
    #: (Worked out once: every message received is parsed, a round trip's two included.)
    _required: int = field(init=False, repr=False, compare=False, default=0)
    _name: str = field(init=False, repr=False, compare=False, default="")

    def __post_init__(self) -> None:
        object.__setattr__(self, "_required", sum(1 for spec in self.fields if not spec.optional))
        object.__setattr__(self, "_name", self.kind.name)

    def parse(self, header: list[Any]) -> list[Any]:
        """The fields after the kind, checked (absent optional ones as None)."""
        given = len(header) - 1
        fields, name = self.fields, self._name
        if not self._required <= given <= len(fields):
            raise ProtocolError(f"{name} is [{', '.join([name, *(f.name for f in fields)])}]")
        values = []
        for position in range(given):
            spec, value = fields[position], header[position + 1]
            if isinstance(spec.type, Record) and type(value) is not dict:
                raise ProtocolError(f"{name} is {self.spelled()}: {spec.name} must be a map")
            values.append(spec.check(value, name))
        if given < len(fields):
            values.extend([None] * (len(fields) - given))
        return values

    def spelled(self) -> str:
        names = [self.kind.name, *((f"{f.name}?" if f.optional else f.name) for f in self.fields)]
        return "[" + ", ".join(names) + "]"


_TEXT = 256
_SECRET = 4096

HELLO_INFO = Record("hello", "Who the client is and what it asks for.", (
    Field("protocol", int, "the client's PROTOCOL_VERSION; a mismatch (or none) is REFUSED with both versions named",
          optional=True),
    Field("libremote", str, "the client's libremote version", 64, optional=True),
    Field("torch", str, "the client's torch version", 64, optional=True),
    Field("python", str, "the client's Python version", 64, optional=True),
    Field("pid", int, "the client's process id (shown by STATUS)", optional=True),
    Field("host", str, "the client's host name (shown by STATUS)", _TEXT, optional=True),
    Field("argv", str, "the client's command line, cut (the client sends at most 200 characters)", 1024, optional=True),
    Field("tenant", str, "plain TCP with a tenants file: the tenant's name (ignored under CURVE)", _TEXT, optional=True),
    Field("token", str, "plain TCP with a tenants file: the tenant's token", _SECRET, optional=True),
    Field("priority", str, "high, normal or low: at most the tenant's", 16, optional=True),
    Field("devices", int, "how many devices the session wants (LIBREMOTE_DEVICES)", optional=True),
    Field("device_indices", list, "which of the daemon's devices, by index, in the session's order (entries "
          "tcp://host:port#N of LIBREMOTE_SERVER, a pool's placement); absent: the daemon places by its policy. "
          "A daemon whose WELCOME features lack device_pins ignores it, and the client refuses to go on", 64,
          optional=True),
    Field("reservation", str, "placed through a pool (etcd://): RID:SECRET of the reservation the pool's "
          "transaction wrote for this daemon; a daemon started with --pool admits only clients whose reservation "
          "it finds and claims in etcd (libremote_wire/pool/reserve.py)", 128, optional=True),
))
WELCOME_INFO = Record("welcome", "The admitted session and where it runs.", (
    Field("session", str, "the session's id", 64),
    Field("protocol", int, "the daemon's PROTOCOL_VERSION"),
    Field("features", list, "what this daemon understands beyond its protocol's first release", 64),
    Field("worker", str, "the ZeroMQ address of the worker that runs the session: BATCH, PING and BYE go "
          "there, from a socket with the same routing id and keys", _TEXT),
    Field("worker_port", int, "the worker's TCP port: a client that reached the front through another "
          "address than the one the worker binds (NAT, a name) uses its own host with this port", optional=True),
    Field("libremote", str, "the daemon's libremote version", 64, optional=True),
    Field("torch", str, "the worker's torch version", 64, optional=True),
    Field("host", str, "the daemon's host name", _TEXT, optional=True),
    Field("pid", int, "the worker's process id", optional=True),
    Field("devices", list, "one map of device facts (name, type, total_memory, ...) per device given", 64),
    Field("heartbeat_s", NUMBER, "how often the client must PING its worker when otherwise silent"),
    Field("tenant", str, "the tenant the session belongs to", _TEXT, optional=True),
    Field("priority", str, "the priority it was admitted with", 16, optional=True),
    Field("memory_quota", int, "bytes the session may hold", optional=True),
))
QUEUED_INFO = Record("queued", "The client waits in the admission queue.", (
    Field("position", int, "its place in line (1: next)"),
    Field("heartbeat_s", NUMBER, "how often to PING the front while waiting"),
    Field("reason", str, "why it waits", 1024, optional=True),
))
STATUS_CREDENTIALS = Record("credentials", "Who asks, on plain TCP (under CURVE the key says it).", (
    Field("token", str, "the admin token", _SECRET, optional=True),
    Field("tenant", str, "a tenant's name (sees its own sessions only)", _TEXT, optional=True),
    Field("tenant_token", str, "that tenant's token", _SECRET, optional=True),
))
ADMIN_REQUEST = Record("admin request", "A live change of quotas, weights or priorities.", (
    Field("token", str, "the admin token (plain TCP)", _SECRET, optional=True),
    Field("tenant_token", str, "a tenant's token (refused: tenants change nothing)", _SECRET, optional=True),
    Field("session", str, "the session to change (or give tenant)", 64, optional=True),
    Field("tenant", str, "the tenant whose sessions, present and future, change", _TEXT, optional=True),
    Field("memory_quota", (int, str), "bytes, or a size such as 16GiB", 64, optional=True),
    Field("weight", (int, float, str), "share of device time", 64, optional=True),
    Field("priority", str, "high, normal or low", 16, optional=True),
    Field("drain", bool, "true: the daemon takes no new sessions (its sessions go on; readiness turns false); "
          "false: it takes them again", optional=True),
))

MESSAGES: dict[Msg, Message] = {m.kind: m for m in (  # type: ignore[misc]
    Message(Msg.HELLO, "client", "Open a session (sent to the front).", (Field("info", HELLO_INFO, "who the client is"),)),
    Message(Msg.WELCOME, "front", "The session is open; the client connects to its worker.",
            (Field("info", WELCOME_INFO, "the session"),)),
    Message(Msg.REFUSED, "front, worker", "The daemon will not serve this client, and says why.",
            (Field("reason", str, "what happened and what to do", 4096),
             Field("kind", str, "why, as a word a client can act on: draining, unhealthy and reservation (the pool's "
                   "reservation does not hold here) mean a client placed through the pool may be placed again "
                   "elsewhere; also protocol, policy, quota, queue_full, other", 32, optional=True))),
    Message(Msg.QUEUED, "front", "The pool is full: HELLO waits in line; WELCOME or REFUSED follows.",
            (Field("info", QUEUED_INFO, "its place"),)),
    Message(Msg.BATCH, "client", "A run of commands for the worker, executed in order.", (
        Field("seq", int, "the batch's number, echoed in its REPLY"),
        Field("commands", list, "the commands (see Commands)"),
        Field("want_reply", bool, "true at a sync point or for an acknowledgement (backpressure)"),
        Field("striped", list, "[[frame, transfer, nbytes], ...]: frames (1 is the first after the header) sent "
              "as CHUNKs on the session's stripes; the frame itself is empty", 1024, optional=True),
    )),
    Message(Msg.REPLY, "worker, front", "The answer to a BATCH that asked for one; with seq nil, an error not "
            "tied to a batch (a malformed message, or the session ended: the error says why).", (
        Field("seq", int, "the BATCH's seq, or nil", optional=True),
        Field("results", list, "one entry per command that yields a result (RESULT_COMMANDS), in order"),
        Field("error", list, "[kind, op, message]: the first failure since the last reply, or nil", 3, optional=True),
        Field("striped", list, "as in BATCH: frames that come as CHUNKs on the client's stripes", 1024, optional=True),
    )),
    Message(Msg.BYE, "client", "The client leaves; its session and memory are freed at once (to the worker; "
            "to the front while queued)."),
    Message(Msg.PING, "client", "The client is alive (sent when otherwise silent: to the front while queued, "
            "to the worker once admitted)."),
    Message(Msg.STATUS, "admin tool, front", "Ask for the pool's state (with credentials on plain TCP) / the "
            "report, as much of it as the asker may see.", (Field("body", dict, "credentials, or the report", optional=True),)),
    Message(Msg.ADMIN, "admin tool, front", "A live change / its result {ok, message, sessions}.",
            (Field("body", dict, "the request (ADMIN_REQUEST), or the result"),)),
    Message(Msg.PULL, "worker (of another daemon)", "Ask a worker for a piece of an export (a cross-server copy, "
            "see the EXPORT and PULL commands). Needs no session: the token is the capability, known only to the "
            "exporting session's client and the worker it handed it to; an export is served once and expires.", (
        Field("token", bytes, "the export's token (EXPORT's result)", EXPORT_TOKEN_BYTES),
        Field("offset", int, "the first byte wanted"),
        Field("length", int, f"how many bytes, at most PULL_CHUNK_BYTES ({PULL_CHUNK_BYTES >> 20} MiB)"),
    )),
    Message(Msg.PULLED, "worker", "The answer to PULL: the piece in one frame, or why not.", (
        Field("offset", int, "as asked"),
        Field("total", int, "the export's size in bytes (0 with an error)"),
        Field("error", str, "why nothing is sent (unknown or expired token, a range outside the export), or nil",
              1024, optional=True),
    )),
    Message(Msg.STRIPE, "client, worker", "On a new connection to the worker, with the same CURVE key as the "
            "session: make it one of the session's stripes (see MAX_STRIPES). The worker answers STRIPE with "
            "the same routing id, or REFUSED (no such session, another key's session, too many stripes).", (
        Field("session_routing_id", bytes, "the routing id of the session's own connection", 256),
    )),
    Message(Msg.CHUNK, "client, worker", "A piece of a striped frame, on a stripe; the piece in one frame.", (
        Field("transfer", int, "the transfer it belongs to (named in a BATCH's or REPLY's striped)"),
        Field("offset", int, "where the piece goes in the frame"),
        Field("nbytes", int, "the whole frame's size"),
    )),
)}

#: A session as the front hands it to the worker that will run it.
SESSION_SPEC = Record("session spec", "Everything a worker needs to run a session the front admitted.", (
    Field("session", str, "the session's id", 64),
    Field("routing_id", bytes, "the client's ZeroMQ routing id: messages from it belong to the session", 256),
    Field("owner", str, "the CURVE identity (ZAP User-Id) that opened it; nil on plain TCP", _TEXT, optional=True),
    Field("devices", list, "indices of the daemon's devices given to it, the first is where it is scheduled", 64),
    Field("tenant", str, "its tenant", _TEXT),
    Field("priority", str, "high, normal or low", 16),
    Field("weight", NUMBER, "its share of device time among its tenant's sessions"),
    Field("memory_quota", int, "bytes it may hold"),
    Field("tenant_quota", int, "bytes the tenant's sessions in the worker may hold together"),
    Field("client", dict, "the HELLO info (shown by STATUS)", 32),
))

CONTROL: dict[Ctl, Message] = {m.kind: m for m in (  # type: ignore[misc]
    Message(Ctl.READY, "worker", "The worker serves clients at this address.", (
        Field("endpoint", str, "where its clients connect", _TEXT),
        Field("pid", int, "its process id"),
    )),
    Message(Ctl.OPEN, "front", "Run this session.", (Field("spec", SESSION_SPEC, "the session"),)),
    Message(Ctl.OPENED, "worker", "The session runs: the client may send its batches.", (
        Field("session", str, "its id", 64),
        Field("error", str, "why it could not be opened, or nil", 1024, optional=True),
    )),
    Message(Ctl.CLOSE, "front", "End this session (its client said BYE to the front, an admin, the front "
            "stopping).", (Field("session", str, "its id", 64), Field("why", str, "told to the client", 1024))),
    Message(Ctl.ENDED, "worker", "A session ended in the worker (BYE, client gone or silent, idle, an offence).", (
        Field("session", str, "its id", 64),
        Field("why", str, "for the log", 1024),
        Field("released", int, "bytes it held"),
        Field("notice", str, "what the front tells the client (its worker may be gone before the client reads "
              "anything from it), or nil when the client ended the session itself", 1024, optional=True),
        Field("figures", dict, "the session's final counters (ops, device_time_s, bytes_in, bytes_out, errors by "
              "kind, graph calls): its tenant's totals in the metrics keep them", 16, optional=True),
    )),
    Message(Ctl.UPDATE, "front", "New quota, weight or priority for a session of the worker.", (
        Field("session", str, "its id", 64),
        Field("changes", dict, "memory_quota, weight, priority; tenant_quota when the change was the tenant's", 8),
    )),
    Message(Ctl.REPORT, "front, worker", "Ask for / answer with the worker's sessions and devices.", (
        Field("request", int, "echoed"),
        Field("report", dict, "sessions (each with its counters), devices, and the messages the worker refused "
              "by reason (the answer only)", 8, optional=True),
    )),
    Message(Ctl.WANT, "worker", "The worker needs more resident device memory than its lease.", (
        Field("device", int, "the daemon's device index"),
        Field("resident", int, "how many more bytes it wants to keep resident"),
        Field("spill", int, "how many more bytes it wants to keep spilled in host RAM"),
        Field("prefetch", bool, "only ahead of use: take nothing from busy peers of its class for it"),
        Field("request", int, "the worker's number for this WANT (its GRANT echoes it)"),
    )),
    Message(Ctl.GRANT, "front", "The worker's leases on a device, now: the answer to a WANT.", (
        Field("device", int, "the daemon's device index"),
        Field("resident", int, "bytes it may keep on the device"),
        Field("spill", int, "bytes it may keep spilled in host RAM"),
        Field("request", int, "the WANT this answers"),
    )),
    Message(Ctl.SHRINK, "front", "Spill down to a smaller lease (others need the room).", (
        Field("device", int, "the daemon's device index"),
        Field("idle_resident", int, "the new lease if no queued command of the worker uses the device"),
        Field("busy_resident", int, "the new lease if one does"),
        Field("spill", int, "bytes it may keep spilled in host RAM"),
    )),
    Message(Ctl.SHRUNK, "worker", "The worker's leases after a SHRINK, or after its last session on the "
            "device ended (both 0).", (
        Field("device", int, "the daemon's device index"),
        Field("resident", int, "bytes it may keep resident from now on"),
        Field("spill", int, "bytes it may keep spilled from now on"),
        Field("busy", bool, "whether it has queued work"),
    )),
    Message(Ctl.STOP, "front", "No session is left for the worker: it exits."),
)}


@dataclass(frozen=True)
class Command:
    kind: Cmd
    doc: str
    fields: tuple[Field, ...] = field(default=())

    def spelled(self) -> str:
        return "[" + ", ".join([self.kind.name, *((f"{f.name}?" if f.optional else f.name) for f in self.fields)]) + "]"


_HANDLE = Field("handle", int, "a tensor handle the client allocated")
COMMANDS: dict[Cmd, Command] = {c.kind: c for c in (
    Command(Cmd.OP, "Run an aten op; store new outputs under the handles in outs.", (
        Field("op", (int, list), "an op id, or [id, schema name] the first time the session uses it"),
        Field("args", list, "positional arguments (handles, scalars, lists, extension values)"),
        Field("kwargs", dict, "keyword-only arguments by name"),
        Field("outs", ANY, "mirrors the returns: a handle, a list of handles, or nil (in-place, scalars)"),
    )),
    Command(Cmd.OP_SYNC, "As OP, and return the values and output metadata (dynamic shapes, scalars; a sparse "
            "result's layout, dims, nnz, coalesced flag, index dtype and blocksize).", (
        Field("op", (int, list), "as OP"), Field("args", list, "as OP"), Field("kwargs", dict, "as OP"),
        Field("outs", ANY, "as OP"),
    )),
    Command(Cmd.UPLOAD, "Copy the bytes of a frame into tensor dst.", (
        Field("dst", int, "the handle"), Field("dtype", ANY, "the frame's dtype (extension value)"),
        Field("shape", list, "the frame's shape"), Field("frame", int, "the frame's index (1-based)"),
    )),
    Command(Cmd.PUT, "A new tensor on a device from a frame.", (
        Field("new", int, "its handle"), Field("dtype", ANY, "dtype"), Field("shape", list, "shape"),
        Field("stride", list, "stride"), Field("dev", ANY, "the device (extension value)"),
        Field("frame", int, "the frame's index"),
    )),
    Command(Cmd.FETCH, "Return the tensor's bytes (one frame).", (_HANDLE,)),
    Command(Cmd.FREE, "Drop these handles.", (Field("handles", list, "handles"),)),
    Command(Cmd.SYNC, "Wait for the device; return nothing."),
    Command(Cmd.SEED, "Seed the session's generators (or one device's, or one explicit generator's).", (
        Field("seed", int, "the seed"), Field("dev", ANY, "one device only, or a generator reference", optional=True),
    )),
    Command(Cmd.RNG_STATE, "Get / set a device generator's state (setting an explicit generator's returns its seed).", (
        Field("dev", ANY, "the device, or a generator reference"),
        Field("state", bytes, "the state to set", optional=True),
    )),
    Command(Cmd.GENERATOR, "A new explicit generator (torch.Generator(\"cuda\")), named by an id the client "
            "allocates, seeded as torch seeds a new one; without dev: drop it. Op arguments, SEED and RNG_STATE "
            "refer to it as a GENERATOR extension value.", (
        Field("generator", int, "its id"), Field("dev", ANY, "its device (absent: drop it)", optional=True),
    )),
    Command(Cmd.EVENT, "Record a timing event in the session's stream.", (Field("event", int, "its id"),)),
    Command(Cmd.ELAPSED, "Milliseconds between two recorded events.", (
        Field("start", int, "event id"), Field("end", int, "event id"),
    )),
    Command(Cmd.QUERY, "Daemon facts: devices, memory, stats, settings; memory_fraction with a number caps "
            "the session.", (Field("what", str, "the question"), Field("argument", ANY, "its argument", optional=True))),
    Command(Cmd.GRAPH, "Define a graph (graph mode): its inputs and nodes.", (
        Field("graph", int, "its id"), Field("inputs", int, "how many inputs"), Field("nodes", list, "the nodes"),
        Field("outputs", list, "the values it returns"),
    )),
    Command(Cmd.RUN_GRAPH, "Run a graph on handles; outs get the results.", (
        Field("graph", int, "its id"), Field("inputs", list, "handles"), Field("outs", list, "handles"),
    )),
    Command(Cmd.PROGRAM, "A recorded step (OP, RUN_GRAPH, FREE commands); options {ran: false}: recorded "
            "without running (torch.cuda.graph).", (
        Field("program", int, "its id"), Field("commands", list, "the step"),
        Field("options", dict, "options", optional=True),
    )),
    Command(Cmd.REPLAY, "Run a recorded step again.", (Field("program", int, "its id"),)),
    Command(Cmd.STEP, "A repeated step's template (LIBREMOTE_AUTO_REPLAY): OP, RUN_GRAPH and FREE commands whose "
            "handles and float arguments are slots (VALUE extension values), null where RUN_STEP sends a command "
            "inline; commands null: drop it. Taken when the batch is queued.", (
        Field("step", int, "its id"), Field("commands", ANY, "the template, or null"),
    )),
    Command(Cmd.RUN_STEP, "Run a step template: queued as the commands it stands for, the slots and the inline "
            "commands filled in (server/worker/repeated_steps.py).", (
        Field("step", int, "its id"), Field("slots", list, "this step's handles and floats"),
        Field("inline", list, "the commands for the template's holes, in order"),
    )),
    Command(Cmd.SETTINGS, "torch numerics switches for what follows (libremote_wire/numerics.py).",
            (Field("settings", dict, "name -> value"),)),
    Command(Cmd.EXPORT, "Snapshot a dense tensor's bytes (in host memory of the worker) for one PULL by another "
            "daemon's worker; returns [token, nbytes], and under CURVE [token, nbytes, secret key, server key]: a "
            "one-time key pair the exporting worker accepts for this export only, and its own server key (z85). "
            f"Refused beyond {MAX_EXPORTS} unpulled exports or {MAX_EXPORT_BYTES >> 30} GiB per session; "
            f"unpulled exports expire after {EXPORT_TTL_S:g} s.", (_HANDLE,)),
    Command(Cmd.PULL, "A new tensor on a device, with the bytes of an export on another daemon's worker, pulled "
            "worker to worker (never through the client) before the next command runs.", (
        Field("new", int, "its handle"), Field("dtype", ANY, "dtype"), Field("shape", list, "shape (contiguous)"),
        Field("dev", int, "the device: its index in the session"),
        Field("source", str, "the exporting worker's address (tcp://host:port only)", MAX_PEER_ADDRESS),
        Field("token", bytes, "the export's token", EXPORT_TOKEN_BYTES),
        Field("nbytes", int, "the export's size: dtype and shape must match it"),
        Field("secret_key", bytes, "from a CURVE daemon: the export's one-time secret key (EXPORT's result)", 40,
              optional=True),
        Field("server_key", bytes, "from a CURVE daemon: the exporting worker's server key", 40, optional=True),
    )),
)}


def parse(header: Any, declared: dict[Any, Message], *, accepted: frozenset[Any] | None = None,
          at: str = "here") -> tuple[Any, list[Any]]:
    """A decoded header's kind and checked fields, by the declarations in ``declared``; kinds not
    in ``accepted`` (the ones the receiver takes, ``at`` names it) are refused before their fields."""
    check(type(header) is list and bool(header) and type(header[0]) is int,
          "header must be an array starting with a message kind")
    message = declared.get(header[0])
    if message is None or (accepted is not None and message.kind not in accepted):
        takes = f": {at} takes {', '.join(kind.name for kind in sorted(accepted))}" if accepted is not None else ""
        raise ProtocolError(f"unknown message kind {header[0]}{takes}")
    return message.kind, message.parse(header)


def batch_seq(header: Any) -> int | None:
    """The seq to answer a malformed message with: a BATCH's, when it is an integer."""
    if type(header) is list and len(header) > 1 and header[0] == Msg.BATCH and type(header[1]) is int:
        return header[1]
    return None


# ----------------------------------------------------------------------------------------------
# docs/PROTOCOL.md
# ----------------------------------------------------------------------------------------------
def _field_rows(fields: tuple[Field, ...]) -> list[str]:
    rows = []
    for spec in fields:
        bound = f", at most {spec.bound}" if spec.bound else ""
        optional = ", optional" if spec.optional else ""
        rows.append(f"| `{spec.name}` | {spec.type_words()}{bound}{optional} | {spec.doc} |")
    return rows


def markdown() -> str:
    """The protocol reference, from the declarations above."""
    lines = [
        "# The libremote protocol",
        "",
        "Generated from `libremote/wire/messages.py` by `python -m libremote_wire.messages > docs/PROTOCOL.md`;",
        "a test fails when this file is stale. Framing and extension types: `libremote/wire/codec.py`.",
        "",
        f"Protocol version {PROTOCOL_VERSION}. Every message is a MessagePack array (frame 0) followed by raw "
        "frames (tensor bytes) that it refers to by index. Nothing is pickled.",
        "",
        "## Bounds",
        "",
        f"- a header is at most {MAX_FRONT_MESSAGE_BYTES} bytes at the front (before and outside sessions) "
        "and 64 MiB at a worker; arrays nest at most 16 deep where they are walked;",
        f"- a client asks for an acknowledgement every {STREAM_WINDOW_BATCHES} streamed batches or "
        f"{STREAM_WINDOW_BYTES >> 20} MiB of frames;",
        f"- CPU tensors up to {INLINE_TENSOR_BYTES >> 10} KiB may travel inside the header.",
        "",
        "## Messages (client, front, worker)",
        "",
    ]
    for message in MESSAGES.values():
        lines += [f"### {message.kind.name} = {int(message.kind)}", "", f"`{message.spelled()}`, sent by {message.sender}. "
                  f"{message.doc}", ""]
        if message.fields:
            lines += ["| field | type | meaning |", "|---|---|---|", *_field_rows(message.fields), ""]
    lines += ["## Records (maps with declared keys; others are dropped)", ""]
    for record in (HELLO_INFO, WELCOME_INFO, QUEUED_INFO, STATUS_CREDENTIALS, ADMIN_REQUEST, SESSION_SPEC):
        lines += [f"### {record.name}", "", record.doc, "", "| key | type | meaning |", "|---|---|---|",
                  *_field_rows(record.fields), ""]
    lines += ["## Commands (inside a BATCH)", "",
              "Results of " + ", ".join(sorted(c.name for c in RESULT_COMMANDS)) + " go into REPLY.results, in order.", ""]
    for command in COMMANDS.values():
        lines += [f"### {command.kind.name} = {int(command.kind)}", "", f"`{command.spelled()}`. {command.doc}", ""]
        if command.fields:
            lines += ["| field | type | meaning |", "|---|---|---|", *_field_rows(command.fields), ""]
    lines += ["## Control messages (front and workers, over a private socket)", ""]
    for message in CONTROL.values():
        lines += [f"### {message.kind.name} = {int(message.kind)}", "", f"`{message.spelled()}`, sent by {message.sender}. "
                  f"{message.doc}", ""]
        if message.fields:
            lines += ["| field | type | meaning |", "|---|---|---|", *_field_rows(message.fields), ""]
    lines += ["## Errors", "", "REPLY.error is `[kind, op, message]`; kinds: "
              + ", ".join(f"`{kind.value}`" for kind in ErrorKind) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown())
