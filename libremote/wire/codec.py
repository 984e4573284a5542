"""MessagePack framing: how one header is encoded and decoded, with bounds, without torch.

Every message is multipart: frame 0 is a MessagePack *header*, frames 1.. are raw bytes (tensor
data) that the header refers to by index. Bytes of tensors never travel inside MessagePack. Nothing
is ever pickled: every value is one of MessagePack's own types or an extension type below.

Decoding is bounded (each string, array, map and extension; the nesting of what handlers walk is
bounded by :data:`MAX_NESTING`); a header that breaks a bound or is not MessagePack raises
:class:`ProtocolError`. The extension types that name torch objects (dtypes, layouts, memory
formats, small tensors) are decoded by :mod:`.torch_codec` for the peers that hold tensors; here
they are :class:`Opaque` values, which no field of a message the torch-free front takes accepts.
"""

from __future__ import annotations

import enum
import reprlib
import struct
from collections.abc import Callable
from typing import Any

import msgpack


class ProtocolError(ValueError):
    """A message that does not follow the wire format (or breaks one of its bounds)."""


#: Frame 0 larger than this is refused before decoding.
MAX_HEADER_BYTES = 64 << 20
#: Bounds handed to msgpack so a hostile header cannot make the decoder allocate without limit.
UNPACK_LIMITS = dict(
    max_str_len=1 << 20,
    max_bin_len=MAX_HEADER_BYTES,
    max_array_len=1 << 22,
    max_map_len=1 << 16,
    max_ext_len=MAX_HEADER_BYTES,
)
#: Deepest nesting of arrays inside one field of a command (an op argument, its outs, ...). The
#: client's deepest is 2 (an argument that is a list of lists); msgpack decodes up to 1024 levels,
#: and Python code that walks that deep by recursion would die of RecursionError, so every walk of
#: a decoded value refuses anything deeper than this with :class:`ProtocolError`.
MAX_NESTING = 16


class Ext(enum.IntEnum):
    """MessagePack extension type codes."""

    HANDLE = 1  # uint64 little endian: a tensor owned by the sending session
    DTYPE = 2  # ascii name, "float32"
    DEVICE = 3  # uint16 little endian: index of the client's remote device (never a host device)
    LAYOUT = 4  # ascii name, "strided"
    MEMORY_FORMAT = 5  # ascii name, "channels_last"
    TENSOR = 6  # small CPU tensor: msgpack [dtype name, shape, bytes]
    COMPLEX = 7  # two float64, real then imaginary
    VALUE = 8  # uint32 little endian: a value of the graph being defined (its inputs, then nodes)
    GENERATOR = 9  # uint64 little endian: an explicit generator of the sending session (Cmd.GENERATOR)


# (Plain ints in the ExtType values built below: an ExtType's repr shows up in generated code,
# torch.fx's, where an enum's repr would not parse.)
_HANDLE, _VALUE, _GENERATOR = int(Ext.HANDLE), int(Ext.VALUE), int(Ext.GENERATOR)
_U64 = struct.Struct("<Q")
_from_bytes = int.from_bytes
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_C128 = struct.Struct("<dd")


class HandleRef:
    """A decoded HANDLE: the worker resolves it against the sending session's table."""

    __slots__ = ("handle",)

    def __init__(self, handle: int) -> None:
        self.handle = handle

    def __repr__(self) -> str:
        return f"HandleRef({self.handle})"


class ValueRef:
    """A decoded VALUE: in a GRAPH definition, the value of an input or of an earlier node."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __repr__(self) -> str:
        return f"ValueRef({self.index})"


class GeneratorRef:
    """A decoded GENERATOR: the worker resolves it against the sending session's generators."""

    __slots__ = ("id",)

    def __init__(self, generator_id: int) -> None:
        self.id = generator_id

    def __repr__(self) -> str:
        return f"GeneratorRef({self.id})"


class DeviceRef:
    """A decoded DEVICE: index into the devices the daemon gave this session."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __repr__(self) -> str:
        return f"DeviceRef({self.index})"


def _ext(code: int, data: bytes) -> msgpack.ExtType:
    # ExtType is a namedtuple whose __new__ re-checks its fields in Python; on the per-op path
    # (a handle per tensor) build the tuple directly.
    return tuple.__new__(msgpack.ExtType, (code, data))


def handle_ext(handle: int) -> msgpack.ExtType:
    return tuple.__new__(msgpack.ExtType, (_HANDLE, _U64.pack(handle)))  # (_ext inlined: one per new tensor)


def value_ext(index: int) -> msgpack.ExtType:
    return _ext(_VALUE, _U32.pack(index))


def generator_ext(generator_id: int) -> msgpack.ExtType:
    return _ext(_GENERATOR, _U64.pack(generator_id))


_device_exts: dict[int, msgpack.ExtType] = {}


def device_ext(index: int) -> msgpack.ExtType:
    ext = _device_exts.get(index)
    if ext is None:
        ext = _device_exts[index] = msgpack.ExtType(int(Ext.DEVICE), _U16.pack(index))
    return ext


def complex_ext(value: complex) -> msgpack.ExtType:
    return msgpack.ExtType(int(Ext.COMPLEX), _C128.pack(value.real, value.imag))


#: Decoders of the extension types every peer understands (code -> bytes -> value).
BASE_DECODERS: dict[int, Callable[[bytes], Any]] = {
    Ext.HANDLE: lambda data: HandleRef(_U64.unpack(data)[0]),
    Ext.DEVICE: lambda data: DeviceRef(_U16.unpack(data)[0]),
    Ext.VALUE: lambda data: ValueRef(_U32.unpack(data)[0]),
    Ext.GENERATOR: lambda data: GeneratorRef(_U64.unpack(data)[0]),
    Ext.COMPLEX: lambda data: complex(*_C128.unpack(data)),
}


class Opaque:
    """An extension value a torch-free peer does not decode (a dtype, a small tensor): it can
    only be found in the wrong place, and the field's check then says so."""

    __slots__ = ("code",)

    def __init__(self, code: int) -> None:
        self.code = code

    def __repr__(self) -> str:
        return f"<extension value of type {self.code}>"


def ext_hook_for(decoders: dict[int, Callable[[bytes], Any]], *, opaque: bool = False) -> Callable[[int, bytes], Any]:
    """msgpack's ``ext_hook`` for a table of decoders: a code missing from it is an
    :class:`Opaque` value with ``opaque`` (the front), else a :class:`ProtocolError`, as are
    bytes its decoder cannot read."""

    handles = _HANDLE in decoders

    def hook(code: int, data: bytes) -> Any:
        if code == _HANDLE and handles and len(data) == 8:  # (most of a batch's extension values: one call less)
            return HandleRef(_from_bytes(data, "little"))
        decoder = decoders.get(code)
        if decoder is None:
            if opaque:
                return Opaque(code)
            raise ProtocolError(f"unknown extension type {code}")
        try:
            return decoder(data)
        except ProtocolError:
            raise
        except (KeyError, struct.error, ValueError, TypeError, UnicodeDecodeError) as exc:
            raise ProtocolError(f"bad extension value (type {code}): {exc}") from None

    return hook


_BASE_HOOK = ext_hook_for(BASE_DECODERS, opaque=True)


def packb(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def unpackb(data: bytes | memoryview, *, max_bytes: int = MAX_HEADER_BYTES,
            ext_hook: Callable[[int, bytes], Any] = _BASE_HOOK) -> Any:
    """Decode a header, refusing anything malformed or oversized with :class:`ProtocolError`."""
    if len(data) > max_bytes:
        raise ProtocolError(f"header of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        return msgpack.unpackb(data, raw=False, ext_hook=ext_hook, strict_map_key=False, **UNPACK_LIMITS)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types for garbage input
        raise ProtocolError(f"undecodable message: {exc}") from None


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
