"""Repeated steps sent once (``LIBREMOTE_AUTO_REPLAY`` on the client): STEP and RUN_STEP.

A client that sees the same stream of commands between its sync points several times (the same
ops, arguments, shapes and dataflow once handles are named by their first appearance in the
step) sends that stream once as a STEP *template*: its commands with every handle and every
float argument replaced by a slot (a VALUE extension value ``k``), and every command it cannot
template (an UPLOAD, a PUT, a SEED, ...) replaced by ``None``, a hole. From then on it sends
``[RUN_STEP, id, slots, inline]`` instead of the step's commands: ``slots`` holds this step's
handles and floats, ``inline`` the commands for the holes, in order.

The worker expands a RUN_STEP back into the very commands the client would have sent, when the
batch is queued (:func:`expand_batch`), so everything after that, the handlers, the quota, the
error of each command, residency's lookahead, the scheduler's slices, sees exactly the op-by-op
stream: results are bit-identical by construction, and every command is checked as if it had
been sent. A template is only commands: nothing of it runs until a RUN_STEP names it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from libremote_wire import codec
from libremote_wire.codec import HandleRef, ProtocolError, ValueRef
from libremote_wire.messages import Cmd

#: Commands per template, templates per session, and commands one batch may expand to.
MAX_COMMANDS = 100_000
MAX_STEPS_PER_SESSION = 64
MAX_EXPANDED_PER_BATCH = 200_000

#: The commands a template holds, and where each keeps its plain handles (outs, FREE's list).
_TEMPLATED = {Cmd.OP: 4, Cmd.RUN_GRAPH: 3, Cmd.FREE: 1}


@dataclass
class Step:
    """A template: commands with slots, ``None`` where the client sends a command inline."""

    commands: list[Any]
    holes: int
    slots: int  # the highest slot index it names, plus one


def define(wire_commands: Any) -> Step:
    codec.check(isinstance(wire_commands, list) and len(wire_commands) <= MAX_COMMANDS,
                lambda: f"a step template holds at most {MAX_COMMANDS} commands")
    holes = 0
    highest = [-1]
    for position, command in enumerate(wire_commands):
        if command is None:
            holes += 1
            continue
        codec.check(isinstance(command, list) and bool(command) and command[0] in _TEMPLATED
                    and len(command) == _TEMPLATED[command[0]] + 1,
                    lambda: f"step template command {position}: only OP, RUN_GRAPH and FREE commands")
        _highest_slot(command, highest, 0)
    return Step(list(wire_commands), holes, highest[0] + 1)


def _highest_slot(value: Any, highest: list[int], depth: int) -> None:
    if depth > codec.MAX_NESTING:
        raise ProtocolError("a step template nests too deep")
    if type(value) is ValueRef:
        highest[0] = max(highest[0], value.index)
    elif type(value) is list:
        for item in value:
            _highest_slot(item, highest, depth + 1)
    elif type(value) is dict:
        for item in value.values():
            _highest_slot(item, highest, depth + 1)


def expand(step: Step, slots: Any, inline: Any) -> list[Any]:
    """The commands a RUN_STEP stands for."""
    codec.check(isinstance(slots, list) and len(slots) == step.slots,
                lambda: f"RUN_STEP: the step takes {step.slots} slots")
    codec.check(all(type(value) in (int, float) for value in slots), "RUN_STEP slots are handles and floats")
    codec.check(isinstance(inline, list) and len(inline) == step.holes,
                lambda: f"RUN_STEP: the step takes {step.holes} inline commands")
    commands: list[Any] = []
    held = 0
    for command in step.commands:
        if command is None:
            commands.append(inline[held])
            held += 1
            continue
        plain_at = _TEMPLATED[command[0]]
        filled = [command[0]]
        for position in range(1, len(command)):
            field = command[position]
            filled.append(_plain(field, slots, 0) if position == plain_at else _value(field, slots, 0))
        commands.append(filled)
    return commands


def _value(value: Any, slots: list[Any], depth: int) -> Any:
    kind = type(value)
    if kind is ValueRef:
        slot = slots[value.index]
        return HandleRef(slot) if type(slot) is int else slot
    if kind is list:
        return [_value(item, slots, depth + 1) for item in value]
    if kind is dict:
        return {key: _value(item, slots, depth + 1) for key, item in value.items()}
    return value


def _plain(value: Any, slots: list[Any], depth: int) -> Any:
    kind = type(value)
    if kind is ValueRef:
        slot = slots[value.index]
        if type(slot) is not int:
            raise ProtocolError("RUN_STEP: a handle slot holds a float")
        return slot
    if kind is list:
        return [_plain(item, slots, depth + 1) for item in value]
    return value


def expand_batch(steps: dict[int, Step], commands: list[Any]) -> list[Any]:
    """``commands`` with STEP definitions taken in (into ``steps``) and RUN_STEPs expanded. A
    malformed one becomes ``[RUN_STEP, message]``, which fails as a protocol error when its turn
    comes (the commands before it run, as with any malformed command)."""
    out: list[Any] = []
    for command in commands:
        if type(command) is not list or not command or command[0] not in (Cmd.STEP, Cmd.RUN_STEP):
            out.append(command)
            continue
        try:
            if command[0] == Cmd.STEP:
                codec.check(len(command) == 3 and type(command[1]) is int, "STEP takes [STEP, id, commands]")
                if command[2] is None:
                    steps.pop(command[1], None)
                    continue
                codec.check(command[1] in steps or len(steps) < MAX_STEPS_PER_SESSION,
                            lambda: f"a session may keep at most {MAX_STEPS_PER_SESSION} step templates")
                steps[command[1]] = define(command[2])
                continue
            codec.check(len(command) == 4 and type(command[1]) is int, "RUN_STEP takes [RUN_STEP, id, slots, inline]")
            step = steps.get(command[1])
            if step is None:
                raise ProtocolError(f"step template {codec.brief(command[1])} was never defined in this session")
            codec.check(len(out) + len(step.commands) <= MAX_EXPANDED_PER_BATCH,
                        lambda: f"a batch may expand to at most {MAX_EXPANDED_PER_BATCH} commands")
            out.extend(expand(step, command[2], command[3]))
        except (ProtocolError, IndexError) as exc:
            message = str(exc) if isinstance(exc, ProtocolError) else "RUN_STEP: a slot index out of range"
            out.append([Cmd.RUN_STEP, message])
    return out
