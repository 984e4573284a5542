"""The libremote wire format: the one place that says what travels between client and daemon.

Transport
---------
ZeroMQ DEALER (client) <-> ROUTER (daemon). Every message is multipart: frame 0 is a msgpack
*header*; frames 1.. are raw tensor bytes that the header refers to by index. Tensor bytes never
travel inside msgpack (large frames go zero-copy through ZeroMQ). Nothing is ever pickled: the
daemon is a security boundary, and every value on the wire is one of msgpack's own types or one of
the extension types declared below.

Messages (header = msgpack array, first element a :class:`Msg`)
----------------------------------------------------------------
=========  ===========================================  ==========================================
kind       header                                       meaning
=========  ===========================================  ==========================================
HELLO      [HELLO, info]                                client introduces itself (versions, pid)
WELCOME    [WELCOME, info]                              daemon accepts: session id, devices, caps
REFUSED    [REFUSED, reason]                            daemon refuses the client (and says why)
BATCH      [BATCH, seq, commands, want_reply]           a run of commands, executed in order
REPLY      [REPLY, seq, results, error]                 answer to a BATCH that asked for one
BYE        [BYE]                                        client is leaving; free the session
PING       [PING]                                       client is alive (sent when otherwise idle)
QUEUED     [QUEUED, info]                               the pool is full: HELLO waits in line
STATUS     [STATUS, credentials?] / [STATUS, report]    ask for / answer with the pool's state
ADMIN      [ADMIN, request] / [ADMIN, result]           change quotas, weights, priorities live
=========  ===========================================  ==========================================

HELLO's info may carry ``tenant``, ``token`` and ``priority``; a daemon whose sessions are all
taken answers QUEUED (with the position in line) and sends WELCOME when a place frees up, or
REFUSED. STATUS and ADMIN need no session (``libremote status``, ``libremote admin``) but an
identity (server/auth.py): with CURVE the connection's key; on plain TCP ``token`` (the admin
token) or ``tenant`` and ``tenant_token`` in STATUS's credentials and ADMIN's request. A tenant's
report holds its own sessions only; a STATUS from nobody the daemon knows is answered REFUSED.
With CURVE, the tenant and token in HELLO are ignored: the key names the tenant.

A session whose client sends nothing, not even PING, for the daemon's heartbeat timeout is
reclaimed (the client was killed or lost its network); WELCOME says how often to PING.

A BATCH that does not ask for a reply gets none: ops stream. When one asks (a sync point), the
REPLY carries the results of the commands that produce one (:data:`RESULT_COMMANDS`), in order,
and ``error``: the first failure since the last reply, if any, so that an asynchronous failure
surfaces at the next sync point, as on CUDA.

Streaming has backpressure: the client asks for a reply on a streamed batch (an acknowledgement)
at least every :data:`STREAM_WINDOW_BATCHES` batches or :data:`STREAM_WINDOW_BYTES` bytes of
frames, and waits for the previous acknowledgement before asking again. A daemon ends the session
of a client that streams much further without asking. A REPLY whose ``seq`` is nil answers a
message whose seq could not be read, or tells the client its session was ended (and why).

Commands (each a msgpack array, first element a :class:`Cmd`)
--------------------------------------------------------------
=========  ==========================================  ==========================================
command    fields                                      effect on the daemon
=========  ==========================================  ==========================================
OP         [OP, op, args, kwargs, outs]                run an aten op; store new outputs as outs
OP_SYNC    [OP_SYNC, op, args, kwargs, outs]           same, and return values and output metadata
UPLOAD     [UPLOAD, dst, dtype, shape, frame]          copy bytes of ``frame`` into tensor ``dst``
PUT        [PUT, new, dtype, shape, stride, dev, frame]  a new tensor on device ``dev`` from ``frame``
FETCH      [FETCH, handle]                             return the tensor's bytes (one frame)
FREE       [FREE, [handle, ...]]                       drop these handles
SYNC       [SYNC]                                      wait for the device; return nothing
SEED       [SEED, seed] / [SEED, seed, dev]            seed the session's generators (or one device's,
                                                       or, with a generator reference, that generator)
RNG_STATE  [RNG_STATE, dev] / [..., dev, state bytes]  get / set a device generator's state (dev may be a
                                                       generator reference; setting one returns its seed)
GENERATOR  [GENERATOR, id, dev] / [GENERATOR, id]      a new generator ``id`` on device ``dev`` (seeded as
                                                       torch seeds a new one) / drop it
EVENT      [EVENT, event_id]                           record a timing event in the stream
ELAPSED    [ELAPSED, start_id, end_id]                 milliseconds between two recorded events
QUERY      [QUERY, what, argument?]                    "devices" or "memory": daemon facts; also
                                                       "memory_fraction" with a number: cap the session
SETTINGS   [SETTINGS, {name: value}]                   torch numerics switches (numerics.py)
=========  ==========================================  ==========================================

``op`` is an integer interned per session, or ``[id, "aten::add.Tensor"]`` the first time a
session uses that op: ops travel by schema name, so a client and a daemon on different torch
versions agree on what an op is. Arguments travel by schema position (positional) and name
(keyword-only), with arguments equal to their defaults dropped, so an op whose newer schema grew
a defaulted argument still runs on an older daemon. ``outs`` mirrors the op's returns: a handle,
a list of handles (``Tensor[]``) or nil for a return that is not a new tensor (in-place results,
scalars). Handles are integers the *client* allocates, so no op ever waits for the daemon.

Explicit generators (``torch.Generator("cuda")``) are the session's too, named by integers the
client allocates (a namespace of their own): GENERATOR makes or drops one, and an op argument,
SEED or RNG_STATE refers to one as an EXT_GENERATOR value.
"""

from __future__ import annotations

import ctypes
import enum
import reprlib
import struct
from typing import Any, Callable

import msgpack
import torch

PROTOCOL_VERSION = 1

#: Frame 0 larger than this is refused before decoding.
MAX_HEADER_BYTES = 64 << 20
#: Bounds handed to msgpack so a hostile header cannot make the decoder allocate without limit.
_UNPACK_LIMITS = dict(
    max_str_len=1 << 20,
    max_bin_len=MAX_HEADER_BYTES,
    max_array_len=1 << 22,
    max_map_len=1 << 16,
    max_ext_len=MAX_HEADER_BYTES,
)
#: CPU tensors up to this size travel inside the header (op arguments such as a 0-dim scalar).
INLINE_TENSOR_BYTES = 64 << 10
#: Deepest nesting of arrays inside one field of a command (an op argument, its outs, ...). The
#: client's deepest is 2 (an argument that is a list of lists); msgpack decodes up to 1024 levels,
#: and Python code that walks that deep by recursion would die of RecursionError, so the daemon
#: refuses anything deeper than this with :class:`ProtocolError` wherever it walks a value.
MAX_NESTING = 16

#: Backpressure for streamed batches (those that ask for no reply). The client asks for a reply,
#: an acknowledgement, on a batch at least every STREAM_WINDOW_BATCHES batches or
#: STREAM_WINDOW_BYTES bytes of frames, and before it asks again it waits for the previous
#: acknowledgement: at most two windows are ever on the wire or queued on the daemon. The daemon
#: holds clients to a multiple of this (server/limits.py) and ends the session of one that
#: streams further without asking.
STREAM_WINDOW_BATCHES = 64
STREAM_WINDOW_BYTES = 64 << 20


class Msg(enum.IntEnum):
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


class Cmd(enum.IntEnum):
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
    GRAPH = 12  # [GRAPH, graph id, input count, nodes, outputs]: define a graph (graph mode)
    RUN_GRAPH = 13  # [RUN_GRAPH, graph id, inputs, outs]: run it on handles; outs get the results
    PROGRAM = 14  # [PROGRAM, program id, commands, options?]: a recorded step (OP, RUN_GRAPH, FREE
    #               commands); options {"ran": False}: recorded without running (torch.cuda.graph)
    REPLAY = 15  # [REPLAY, program id]: run the recorded commands again
    SETTINGS = 16  # [SETTINGS, {name: value}]: torch numerics switches for what follows (numerics.py)
    GENERATOR = 17  # [GENERATOR, id, device]: a new explicit generator; [GENERATOR, id]: drop it


#: Commands whose execution yields an entry in REPLY.results.
RESULT_COMMANDS = frozenset(
    {Cmd.OP_SYNC, Cmd.FETCH, Cmd.SYNC, Cmd.RNG_STATE, Cmd.ELAPSED, Cmd.QUERY}
)


class ErrorKind(str, enum.Enum):
    """What went wrong, as the daemon reports it in REPLY.error = [kind, op, message]."""

    OP = "op"  # the op itself raised (bad arguments that local inference could not catch, ...)
    OOM = "oom"  # out of device memory or over the session's quota
    REFUSED = "refused"  # the op is not on the daemon's allowlist
    HANDLE = "handle"  # a handle that this session does not own (or that a failed op never made)
    PROTOCOL = "protocol"  # a malformed message
    SESSION = "session"  # the daemon does not know this session (restarted, reclaimed)


# ----------------------------------------------------------------------------------------------
# Extension types
# ----------------------------------------------------------------------------------------------
EXT_HANDLE = 1  # uint64 little endian: a tensor owned by the sending session
EXT_DTYPE = 2  # ascii name, "float32"
EXT_DEVICE = 3  # uint16 little endian: index of the client's remote device (never a host device)
EXT_LAYOUT = 4  # ascii name, "strided"
EXT_MEMORY_FORMAT = 5  # ascii name, "channels_last"
EXT_TENSOR = 6  # small CPU tensor: msgpack [dtype name, shape, bytes]
EXT_COMPLEX = 7  # two float64, real then imaginary
EXT_VALUE = 8  # uint32 little endian: a value of the graph being defined (its inputs, then nodes)
EXT_GENERATOR = 9  # uint64 little endian: an explicit generator of the sending session (GENERATOR)

_U64 = struct.Struct("<Q")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_C128 = struct.Struct("<dd")

DTYPES: dict[str, torch.dtype] = {
    name: value for name, value in vars(torch).items() if isinstance(value, torch.dtype)
}
_DTYPE_NAMES: dict[torch.dtype, str] = {}
for _name, _dtype in DTYPES.items():
    # Prefer the canonical name ("float32" over the alias "float") as str(dtype) spells it.
    if str(_dtype) == f"torch.{_name}":
        _DTYPE_NAMES[_dtype] = _name
LAYOUTS: dict[str, torch.layout] = {"strided": torch.strided}
MEMORY_FORMATS: dict[str, torch.memory_format] = {
    "contiguous_format": torch.contiguous_format,
    "channels_last": torch.channels_last,
    "channels_last_3d": torch.channels_last_3d,
    "preserve_format": torch.preserve_format,
}
_MEMORY_FORMAT_NAMES = {value: name for name, value in MEMORY_FORMATS.items()}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]


class HandleRef:
    """A decoded EXT_HANDLE: the daemon resolves it against the sending session's table."""

    __slots__ = ("handle",)

    def __init__(self, handle: int) -> None:
        self.handle = handle

    def __repr__(self) -> str:
        return f"HandleRef({self.handle})"


class ValueRef:
    """A decoded EXT_VALUE: in a GRAPH definition, the value of an input or of an earlier node."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __repr__(self) -> str:
        return f"ValueRef({self.index})"


class GeneratorRef:
    """A decoded EXT_GENERATOR: the daemon resolves it against the sending session's generators."""

    __slots__ = ("id",)

    def __init__(self, generator_id: int) -> None:
        self.id = generator_id

    def __repr__(self) -> str:
        return f"GeneratorRef({self.id})"


class DeviceRef:
    """A decoded EXT_DEVICE: index into the devices the daemon gave this session."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __repr__(self) -> str:
        return f"DeviceRef({self.index})"


class ProtocolError(ValueError):
    """A message that does not follow this module's format."""


_dtype_exts = {dtype: msgpack.ExtType(EXT_DTYPE, name.encode()) for dtype, name in _DTYPE_NAMES.items()}
_device_exts: dict[int, msgpack.ExtType] = {}
_memory_format_exts = {
    fmt: msgpack.ExtType(EXT_MEMORY_FORMAT, name.encode()) for fmt, name in _MEMORY_FORMAT_NAMES.items()
}
_layout_exts = {torch.strided: msgpack.ExtType(EXT_LAYOUT, b"strided")}


def _ext(code: int, data: bytes) -> msgpack.ExtType:
    # ExtType is a namedtuple whose __new__ re-checks its fields in Python; on the per-op path
    # (a handle per tensor) build the tuple directly.
    return tuple.__new__(msgpack.ExtType, (code, data))


def handle_ext(handle: int) -> msgpack.ExtType:
    return _ext(EXT_HANDLE, _U64.pack(handle))


def value_ext(index: int) -> msgpack.ExtType:
    return _ext(EXT_VALUE, _U32.pack(index))


def generator_ext(generator_id: int) -> msgpack.ExtType:
    return _ext(EXT_GENERATOR, _U64.pack(generator_id))


def dtype_ext(dtype: torch.dtype) -> msgpack.ExtType:
    return _dtype_exts[dtype]


def device_ext(index: int) -> msgpack.ExtType:
    ext = _device_exts.get(index)
    if ext is None:
        ext = _device_exts[index] = msgpack.ExtType(EXT_DEVICE, _U16.pack(index))
    return ext


def layout_ext(layout: torch.layout) -> msgpack.ExtType:
    try:
        return _layout_exts[layout]
    except KeyError:
        raise NotImplementedError(f"libremote supports strided tensors only, not {layout}") from None


def memory_format_ext(fmt: torch.memory_format) -> msgpack.ExtType:
    return _memory_format_exts[fmt]


def complex_ext(value: complex) -> msgpack.ExtType:
    return msgpack.ExtType(EXT_COMPLEX, _C128.pack(value.real, value.imag))


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (any dtype, bfloat16 included).

    The view keeps the tensor alive (ZeroMQ may send it after the caller returns). It does not
    go through ``Tensor.numpy()``, which would mark the tensor's storage as never resizable.
    """
    flat = tensor.reshape(-1)
    nbytes = flat.numel() * flat.element_size()
    if nbytes == 0:
        return memoryview(b"")
    buffer = (ctypes.c_char * nbytes).from_address(flat.data_ptr())
    buffer._owner = flat  # type: ignore[attr-defined]
    return memoryview(buffer).cast("B")


def tensor_from_bytes(buffer: Any, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    """A CPU tensor that views ``buffer`` (kept alive by the tensor) or, when the buffer is not
    aligned for ``dtype``, a copy of it. Checks the length."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = 1
    for size in shape:
        if size < 0:
            raise ProtocolError(f"negative size in shape {shape}")
        numel *= size
    view = memoryview(buffer)
    if view.nbytes != numel * itemsize:
        raise ProtocolError(
            f"a {dtype} tensor of shape {list(shape)} needs {numel * itemsize} bytes, "
            f"the frame holds {view.nbytes}"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(view, dtype=torch.uint8)
    if flat.data_ptr() % itemsize:
        # ZeroMQ frames start wherever its buffers put them (large ones 8 bytes in); kernels need
        # natural alignment (complex128 crashes without it), so such a frame is copied into a
        # fresh, aligned tensor.
        flat = flat.clone()
    return flat.view(dtype).view(shape)


def inline_tensor_ext(tensor: torch.Tensor) -> msgpack.ExtType:
    tensor = tensor.detach().contiguous()
    payload = packb([_DTYPE_NAMES[tensor.dtype], list(tensor.shape), bytes(tensor_bytes(tensor))])
    return msgpack.ExtType(EXT_TENSOR, payload)


def _ext_hook(code: int, data: bytes) -> Any:
    try:
        if code == EXT_HANDLE:
            return HandleRef(_U64.unpack(data)[0])
        if code == EXT_DTYPE:
            return DTYPES[data.decode()]
        if code == EXT_DEVICE:
            return DeviceRef(_U16.unpack(data)[0])
        if code == EXT_LAYOUT:
            return LAYOUTS[data.decode()]
        if code == EXT_MEMORY_FORMAT:
            return MEMORY_FORMATS[data.decode()]
        if code == EXT_VALUE:
            return ValueRef(_U32.unpack(data)[0])
        if code == EXT_GENERATOR:
            return GeneratorRef(_U64.unpack(data)[0])
        if code == EXT_COMPLEX:
            real, imag = _C128.unpack(data)
            return complex(real, imag)
        if code == EXT_TENSOR:
            dtype_str, shape, raw = msgpack.unpackb(data, raw=False, **_UNPACK_LIMITS)
            # Copy: the header buffer is not ours to keep.
            return tensor_from_bytes(bytearray(raw), DTYPES[dtype_str], shape).clone()
    except (KeyError, struct.error, ValueError, TypeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"bad extension value (type {code}): {exc}") from None
    raise ProtocolError(f"unknown extension type {code}")


def packb(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpackb(data: bytes | memoryview, *, max_bytes: int = MAX_HEADER_BYTES) -> Any:
    """Decode a header, refusing anything malformed or oversized with :class:`ProtocolError`."""
    if len(data) > max_bytes:
        raise ProtocolError(f"header of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        return msgpack.unpackb(
            data, raw=False, ext_hook=_ext_hook, strict_map_key=False, **_UNPACK_LIMITS
        )
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types for garbage input
        raise ProtocolError(f"undecodable message: {exc}") from None


def tensor_meta(tensor: torch.Tensor) -> list[Any]:
    """What the client needs to build a wrapper for a tensor the daemon made."""
    return [dtype_ext(tensor.dtype), list(tensor.shape), list(tensor.stride()), tensor.storage_offset()]


_BRIEF = reprlib.Repr()
_BRIEF.maxlevel = 3
_BRIEF.maxstring = _BRIEF.maxother = 60


def brief(value: Any) -> str:
    """A short repr of a decoded (possibly hostile: huge, 1000-deep) value, for error messages:
    bounded in length and in the depth it walks."""
    return _BRIEF.repr(value)


def check(condition: bool, message: str | Callable[[], str]) -> None:
    """Raise :class:`ProtocolError` unless ``condition``; used to validate decoded headers."""
    if not condition:
        raise ProtocolError(message() if callable(message) else message)
