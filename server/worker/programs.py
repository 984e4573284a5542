"""Whole-step capture on the daemon: a client's recorded commands, replayed on request.

``libremote.capture_step`` records the commands a client sends during one training step and
sends them as a PROGRAM; each REPLAY runs them again through the session's own handlers, so every
op is checked exactly as when it was first sent. ``torch.cuda.graph`` records the same way but
runs nothing while it records (as a CUDA graph capture launches nothing): its PROGRAM says so and
lists the results the client holds, which the daemon allocates at once, uninitialised, for every
replay to write into. Only commands that need no answer and carry no
host data can be recorded (ops, graph runs, frees).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from libremote_wire import codec, messages

from . import values

#: Bounds on what one client may define: commands per program and programs per session.
MAX_COMMANDS = 100_000
MAX_PROGRAMS_PER_SESSION = 512


@dataclass
class Program:
    """A recorded step (``libremote.capture_step``): the commands a client sent while recording,
    replayed in order. ``created``: handles its commands produce; a replay drops the previous
    replay's before running. FREEs of handles made before the recording are left out (those
    tensors are long gone), so a replay frees only what the step itself made."""

    commands: list[list[Any]]
    created: frozenset[int]
    #: Handles made before the recording that its commands read (a CUDA-graph capture holds them).
    reads: frozenset[int] = frozenset()


#: What a recording may hold: commands that need no answer and carry no host data.
_PROGRAM_COMMANDS = {messages.Cmd.OP: 4, messages.Cmd.RUN_GRAPH: 3}


def define(wire_commands: Any) -> Program:
    codec.check(isinstance(wire_commands, list) and len(wire_commands) <= MAX_COMMANDS,
                   lambda: f"a captured step holds at most {MAX_COMMANDS} commands")
    created: set[int] = set()
    named: set[int] = set()
    commands: list[list[Any]] = []
    for position, command in enumerate(wire_commands):
        codec.check(isinstance(command, list) and bool(command) and isinstance(command[0], int),
                       lambda: f"captured command {position} is malformed")
        kind = command[0]
        if kind == messages.Cmd.FREE:
            codec.check(len(command) == 2 and isinstance(command[1], list), "FREE takes [FREE, [handles]]")
            kept = [handle for handle in command[1] if handle in created]
            if kept:
                commands.append([messages.Cmd.FREE, kept])
            continue
        codec.check(kind in _PROGRAM_COMMANDS,
                       lambda: f"captured command {position}: only ops, graph runs and frees can be replayed")
        outs_at = _PROGRAM_COMMANDS[kind]
        codec.check(len(command) > outs_at, lambda: f"captured command {position} is malformed")
        named.update(values.handles_named(command))
        created.update(h for h in values.flatten_handles(command[outs_at]) if type(h) is int)
        commands.append(command)
    return Program(commands, frozenset(created), frozenset(named - created))
