"""Repeated steps sent as one command, without the program asking (``LIBREMOTE_AUTO_REPLAY``).

Layer 1, the session: :mod:`.session` feeds it every command it sends.

A *step* is what the session sends between two sync points (``.item()``, ``.cpu()``,
``synchronize``: whatever waits for the daemon). Each command of a step is normalised: every
handle becomes a slot numbered by its first appearance in the step, every float argument a slot
of its own, and commands that cannot be templated (an UPLOAD, a PUT, a SEED, a graph definition,
...) a hole that only says what kind of command goes there. Two steps with equal normalised
commands are the same ops, on the same shapes (a shape is an argument, or follows from the
handles' dataflow), with the same dataflow between handles; and the normalised commands with the
step's slots filled in are exactly the commands sent, so nothing is lost.

After ``repeats`` equal steps sent op by op, the session sends the normalised step once as a STEP
template. From then on each step's commands are *held back* as the program issues them and
compared with the templates one by one: while they match, nothing is sent; when the step ends
(its sync point) and matched a template to its end, the session sends one RUN_STEP (the slots,
and the hole commands inline) instead, and the daemon expands it to the same commands
(server/worker/repeated_steps.py), so results are bit-identical to op by op. The moment a
command matches no template (a branch on the step number, a new batch shape), the held commands
go out as they are and the rest of the step streams op by op, exactly as without the feature.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from libremote_wire.codec import Ext, value_ext
from libremote_wire.messages import Cmd

#: Commands whose handles and floats become slots, and where each keeps its plain handles.
_TEMPLATED = {Cmd.OP: 4, Cmd.RUN_GRAPH: 3, Cmd.FREE: 1}
#: Bounds: templates per session (the daemon keeps 64), commands per template, steps seen.
MAX_TEMPLATES = 16
MAX_TEMPLATE_COMMANDS = 50_000
_MAX_COUNTED = 256

_HANDLE_CODE = int(Ext.HANDLE)
_U64 = struct.Struct("<Q")
_ExtType = msgpack.ExtType


class _Marker:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_SLOT, _DICT, _BOOL, _HOLE = _Marker("slot"), _Marker("dict"), _Marker("bool"), _Marker("hole")
_NO_KWARGS = (_DICT, ())


@dataclass
class Template:
    id: int
    keys: tuple[Any, ...]


@dataclass
class Stats:
    replayed: int = 0  # steps sent as one RUN_STEP
    op_by_op: int = 0  # steps sent command by command (learning, or a fallback)
    templates: int = 0  # STEP templates sent
    fallbacks: int = 0  # steps that started matching a template and diverged
    last_fallback: str | None = None
    reasons: dict[str, int] = field(default_factory=dict)


class StepTracker:
    """The session's view of the current step: its normalised commands, its slots, and the
    templates it still matches (``matching``: commands are held back meanwhile)."""

    def __init__(self, repeats: int, op_name: Callable[[int], str] = str) -> None:
        self.repeats = repeats
        self._op_name = op_name
        self.stats = Stats()
        self.templates: list[Template] = []
        self._counts: dict[tuple[Any, ...], int] = {}
        self._next_id = 1
        self.keys: list[Any] = []
        self.slots: list[Any] = []
        self._index: dict[Any, int] = {}
        self.holes: list[list[Any]] = []
        self.candidates: list[Template] = []
        self.matching = False
        self.valid = True  # False: this step is not counted (a recording ran in it, ...)

    # ------------------------------------------------------------------------------------------
    def begin(self) -> None:
        """A new step starts (after a sync point)."""
        self.keys = []
        self.slots = []
        self._index = {}
        self.holes = []
        self.valid = True
        self.candidates = list(self.templates)
        self.matching = bool(self.candidates)

    def observe(self, command: list[Any]) -> bool:
        """Normalise one command of the step; return False if it diverged from every template
        it was matching (the caller sends what it held back)."""
        if not self.matching and len(self.keys) >= MAX_TEMPLATE_COMMANDS:
            self.valid = False  # too long to template: stop looking (a program that never syncs)
            return True
        kind = command[0]
        plain_at = _TEMPLATED.get(kind)
        if plain_at is None:
            key: Any = (_HOLE, kind)
            if self.matching:
                self.holes.append(command)
        elif kind == Cmd.OP and len(command) == 5:  # (the common case, written out: it runs for every op)
            slots, index = self.slots, self._index
            op, kwargs, outs = command[1], command[3], command[4]
            if type(outs) is list and len(outs) == 1 and type(outs[0]) is int:
                slot = index.get(outs[0])
                outs_key: Any = ((_SLOT, slot if slot is not None else _new_slot(outs[0], slots, index)),)
            else:
                outs_key = _plain(outs, slots, index)
            key = (kind, op if type(op) is int else _value(op, slots, index), _sequence(command[2], slots, index),
                   _value(kwargs, slots, index) if kwargs else _NO_KWARGS, outs_key)
        else:
            slots, index = self.slots, self._index
            key = (kind, *[_plain(command[i], slots, index) if i == plain_at else _value(command[i], slots, index)
                           for i in range(1, len(command))])
        position = len(self.keys)
        self.keys.append(key)
        if self.matching:
            self.candidates = [t for t in self.candidates if len(t.keys) > position and t.keys[position] == key]
            if not self.candidates:
                self.matching = False
                self._fallback(f"command {position} ({_name(command, self._op_name)}) matches no repeated step")
                return False
        return True

    def stop_matching(self, why: str) -> None:
        """Something the held-back commands cannot wait for (a large upload, a recording)."""
        if self.matching:
            self.matching = False
            self._fallback(why)

    def _fallback(self, why: str) -> None:
        self.stats.fallbacks += 1
        self.stats.last_fallback = why
        reason = why.split(" (")[0] if why.startswith("command") else why
        reason = "diverged" if why.startswith("command") else reason
        self.stats.reasons[reason] = self.stats.reasons.get(reason, 0) + 1

    def finish(self) -> tuple[list[Any] | None, list[Any] | None]:
        """The step ends at a sync point. Return (RUN_STEP to send instead of the held-back
        commands, or None; a STEP definition to send first, or None)."""
        if self.matching:
            self.matching = False
            whole = [t for t in self.candidates if len(t.keys) == len(self.keys)]
            if whole:
                self.stats.replayed += 1
                return [Cmd.RUN_STEP, whole[0].id, self.slots, self.holes], None
            self._fallback("the step ended before the repeated one did")
        if not self.keys:
            return None, None  # (two sync points in a row: no step between them)
        self.stats.op_by_op += 1
        if not self.valid:
            return None, None
        if all(type(key) is tuple and key[0] is _HOLE for key in self.keys):
            return None, None  # nothing to template
        signature = tuple(self.keys)
        if any(t.keys == signature for t in self.templates):
            return None, None  # (a template it did not match because of a hold-up: not learnt twice)
        if len(self._counts) >= _MAX_COUNTED:
            self._counts.clear()
        seen = self._counts.get(signature, 0) + 1
        self._counts[signature] = seen
        if seen < self.repeats or len(self.templates) >= MAX_TEMPLATES:
            return None, None
        del self._counts[signature]
        template = Template(self._next_id, signature)
        self._next_id += 1
        self.templates.append(template)
        self.stats.templates += 1
        return None, [Cmd.STEP, template.id, [_unkey(key) for key in signature]]


def _new_slot(handle: int, slots: list[Any], index: dict[Any, int]) -> int:
    """A handle's slot, by its number and by its HANDLE extension value's bytes (how arguments name it)."""
    slot = index[handle] = index[_U64.pack(handle)] = len(slots)
    slots.append(handle)
    return slot


def _sequence(values: list[Any], slots: list[Any], index: dict[Any, int]) -> Any:
    """An op's positional arguments' key (:func:`_value` of a list, the usual cases inline)."""
    keys: list[Any] = []
    for value in values:
        kind = type(value)
        if kind is _ExtType and value.code == _HANDLE_CODE:
            slot = index.get(value.data)
            if slot is None:
                slot = _new_slot(_U64.unpack(value.data)[0], slots, index)
            keys.append((_SLOT, slot))
        elif kind is float:
            slots.append(value)
            keys.append((_SLOT, len(slots) - 1))
        elif kind is int or kind is str or value is None:
            keys.append(value)
        else:
            keys.append(_value(value, slots, index))
    return tuple(keys)


def _value(value: Any, slots: list[Any], index: dict[Any, int]) -> Any:
    """An argument's key: handles and floats become slots (their values appended to ``slots``)."""
    kind = type(value)
    if kind is list:
        return _sequence(value, slots, index)
    if kind is _ExtType:
        if value.code == _HANDLE_CODE:
            slot = index.get(value.data)
            if slot is None:
                slot = _new_slot(_U64.unpack(value.data)[0], slots, index)
            return (_SLOT, slot)
        return value
    if kind is float:
        slots.append(value)
        return (_SLOT, len(slots) - 1)
    if kind is bool:
        return (_BOOL, value)  # (True == 1 in a tuple's comparison: kept apart)
    if kind is dict:
        return (_DICT, tuple([(name, _value(item, slots, index)) for name, item in value.items()]))
    return value


def _plain(value: Any, slots: list[Any], index: dict[Any, int]) -> Any:
    """Plain handles (an op's outs, FREE's list): every int is a slot."""
    kind = type(value)
    if kind is int:
        slot = index.get(value)
        return (_SLOT, slot if slot is not None else _new_slot(value, slots, index))
    if kind is list:
        return tuple([_plain(item, slots, index) for item in value])
    if kind is bool:
        return (_BOOL, value)
    return value


def _unkey(key: Any) -> Any:
    """A command's key as the template's wire form: slots as VALUE extension values."""
    if type(key) is not tuple:
        return key
    if key and key[0] is _SLOT:
        return value_ext(key[1])
    if key and key[0] is _BOOL:
        return key[1]
    if key and key[0] is _HOLE:
        return None
    if key and key[0] is _DICT:
        return {name: _unkey(item) for name, item in key[1]}
    return [_unkey(item) for item in key]


def _name(command: list[Any], op_name: Callable[[int], str]) -> str:
    if command[0] in (Cmd.OP, Cmd.OP_SYNC) and len(command) > 1:
        ref = command[1]
        return str(ref[1]) if isinstance(ref, list) else op_name(ref)
    try:
        return Cmd(command[0]).name
    except ValueError:
        return "a command"
