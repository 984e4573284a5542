"""Hostile messages for fuzzing the daemon: hypothesis strategies (tests/test_fuzz.py, CI-sized)
and a fast random generator drawing from the same vocabulary (scripts/fuzz_daemon.py, millions).

Messages look enough like the real thing to get past the first checks (real message and command
kinds, op references to real ops, handles the session owns, frames of plausible sizes) and then
put anything msgpack can carry anywhere: extension values where integers belong, nesting, maps
where lists belong, unknown extension types. Integers stay small, so that no generated op asks
for an allocation that would stress the test machine rather than the daemon.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

import msgpack
import torch
from hypothesis import strategies as st

from libremote_wire import codec, torch_codec
from libremote_wire.messages import Cmd, Msg

#: Handles the fuzzing session puts before it starts (1..HANDLES), so that ops find operands.
HANDLES = 4
#: Ops that compute on their operands without allocating by a size argument.
OP_NAMES = ["aten::add.Tensor", "aten::mul.Tensor", "aten::neg", "aten::sum", "aten::cat",
            "aten::add_.Tensor", "aten::clone", "aten::index.Tensor", "aten::copy_", "aten::view",
            "aten::no_such_op", "prim::device", "aten::_local_scalar_dense", "aten::sort"]
KWARG_NAMES = ["alpha", "dim", "keepdim", "out", "dtype", "device", "generator"]
SETTING_NAMES = ["allow_tf32", "deterministic", "matmul_precision", "bogus"]
QUERIES = ["memory", "stats", "settings", "memory_fraction", "devices", "reset_peak_memory", "bogus"]
_EXT_VALUES = [
    torch_codec.dtype_ext(torch.float32), torch_codec.dtype_ext(torch.int64), torch_codec.dtype_ext(torch.bool),
    torch_codec.inline_tensor_ext(torch.tensor([1.5, -2.0])), torch_codec.inline_tensor_ext(torch.tensor(3)),
    codec.complex_ext(1 - 2j), torch_codec.memory_format_ext(torch.channels_last),
    torch_codec.layout_ext(torch.strided),
    msgpack.ExtType(int(codec.Ext.TENSOR), b"\x93\xa7float32\x91\x05\xc4\x00"),  # 5 floats, no bytes
    msgpack.ExtType(int(codec.Ext.DTYPE), b"float99"), msgpack.ExtType(99, b"x"),
    msgpack.ExtType(int(codec.Ext.HANDLE), b"\x01"), codec.generator_ext(1),
    msgpack.ExtType(int(codec.Ext.GENERATOR), b"\x01"),
]


# ----------------------------------------------------------------------------------------------
# hypothesis strategies (tests/test_fuzz.py)
# ----------------------------------------------------------------------------------------------
handles = st.integers(-1, HANDLES + 8)
small_ints = st.integers(-4, 16)
exts = st.one_of(
    handles.map(lambda h: codec.handle_ext(h) if h >= 0 else msgpack.ExtType(1, b"")),
    st.integers(0, 3).map(codec.device_ext),
    st.integers(0, 6).map(codec.value_ext),
    st.integers(0, 3).map(codec.generator_ext),
    st.sampled_from(_EXT_VALUES),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=12)),
)
scalars = st.one_of(st.none(), st.booleans(), small_ints, st.integers(-(2**63), 2**64 - 1),
                    st.floats(width=32), st.text(max_size=8), st.binary(max_size=8))
leaves = st.one_of(scalars, exts)
values = st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=10)
op_refs = st.one_of(st.integers(1, 6), st.tuples(st.integers(1, 6), st.sampled_from(OP_NAMES)).map(list), values)
arguments = st.lists(st.one_of(leaves, st.lists(leaves, max_size=3)), max_size=4)
outs = st.one_of(st.none(), st.lists(st.one_of(st.integers(HANDLES + 1, HANDLES + 12), st.none(), values), max_size=2))
op_commands = st.builds(lambda kind, ref, args, kwargs, out: [kind, ref, args, kwargs, out],
                        st.sampled_from([Cmd.OP, Cmd.OP_SYNC]), op_refs, arguments,
                        st.dictionaries(st.sampled_from(KWARG_NAMES), leaves, max_size=2), outs)
other_commands = st.builds(lambda kind, rest: [kind, *rest],
                           st.one_of(st.sampled_from(list(Cmd)), st.integers(-2, 40)),
                           st.lists(st.one_of(handles, values), max_size=5))
commands = st.one_of(op_commands, op_commands, other_commands, values)
batches = st.builds(lambda seq, cmds, want: [Msg.BATCH, seq, cmds, want],
                    st.one_of(st.integers(0, 2**31), values), st.lists(commands, max_size=5),
                    st.one_of(st.booleans(), st.booleans(), values))
others = st.builds(lambda kind, rest: [kind, *rest], st.one_of(st.sampled_from(list(Msg)), st.integers(-1, 20)),
                   st.lists(values, max_size=3))
headers = st.one_of(batches, batches, others, values)
frame_lists = st.lists(st.binary(max_size=64), max_size=3)
#: A message as it goes on the wire: packed header bytes (or raw bytes), and frames.
messages = st.tuples(st.one_of(headers.map(codec.packb), headers.map(codec.packb), st.binary(max_size=64)),
                     frame_lists)


# ----------------------------------------------------------------------------------------------
# A fast generator over the same vocabulary (scripts/fuzz_daemon.py)
# ----------------------------------------------------------------------------------------------
class RandomMessages:
    """Random wire messages, about as hostile as :data:`messages`, a few microseconds each."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def message(self) -> tuple[bytes, list[bytes]]:
        rng = self.rng
        frames = [rng.randbytes(rng.randrange(64)) for _ in range(rng.randrange(3))]
        roll = rng.random()
        if roll < 0.05:
            return rng.randbytes(rng.randrange(64)), frames
        header = self.batch() if roll < 0.8 else [rng.choice(list(Msg)) if rng.random() < 0.9 else rng.randrange(-1, 20),
                                                  *[self.value() for _ in range(rng.randrange(3))]]
        return codec.packb(header), frames

    def batch(self) -> list[Any]:
        rng = self.rng
        seq = rng.randrange(2**31) if rng.random() < 0.9 else self.value()
        want = rng.random() < 0.5 if rng.random() < 0.95 else self.value()
        return [Msg.BATCH, seq, [self.command() for _ in range(rng.randrange(5))], want]

    def command(self) -> Any:
        rng = self.rng
        roll = rng.random()
        if roll < 0.6:
            ref = rng.randrange(1, 7) if rng.random() < 0.5 else [rng.randrange(1, 7), rng.choice(OP_NAMES)]
            kwargs = {rng.choice(KWARG_NAMES): self.leaf() for _ in range(rng.randrange(3))}
            out = [rng.randrange(HANDLES + 1, HANDLES + 13) for _ in range(rng.randrange(3))] if rng.random() < 0.8 else self.value()
            return [rng.choice([Cmd.OP, Cmd.OP_SYNC]), ref, [self.argument() for _ in range(rng.randrange(4))], kwargs, out]
        if roll < 0.95:
            kind = rng.choice(list(Cmd)) if rng.random() < 0.95 else rng.randrange(-2, 40)
            return [kind, *[self.handle() if rng.random() < 0.5 else self.value() for _ in range(rng.randrange(5))]]
        return self.value()

    def argument(self) -> Any:
        return [self.leaf() for _ in range(self.rng.randrange(3))] if self.rng.random() < 0.2 else self.leaf()

    def handle(self) -> int:
        return self.rng.randrange(-1, HANDLES + 9)

    def leaf(self) -> Any:
        rng = self.rng
        roll = rng.random()
        if roll < 0.35:
            return codec.handle_ext(rng.randrange(0, HANDLES + 9))
        if roll < 0.45:
            return rng.choice(_EXT_VALUES)
        if roll < 0.5:
            return msgpack.ExtType(rng.randrange(128), rng.randbytes(rng.randrange(12)))
        if roll < 0.55:
            return codec.device_ext(rng.randrange(4))
        return rng.choice([None, True, False, rng.randrange(-4, 17), rng.randrange(-(2**63), 2**64),
                           rng.uniform(-1e6, 1e6), float("nan"), "", "x" * rng.randrange(9), b"\x00\x01",
                           rng.choice(SETTING_NAMES), rng.choice(QUERIES)])

    def value(self, depth: int = 0) -> Any:
        rng = self.rng
        roll = rng.random()
        if depth < 3 and roll < 0.2:
            return [self.value(depth + 1) for _ in range(rng.randrange(4))]
        if depth < 3 and roll < 0.3:
            return {rng.choice(SETTING_NAMES + KWARG_NAMES): self.value(depth + 1) for _ in range(rng.randrange(3))}
        return self.leaf()


class FuzzingClient:
    """A raw session that sends hostile messages and then a marker batch it waits for: replies
    come in order, so the marker's reply means the daemon has handled everything before it. A
    message that ended the session (BYE, HELLO, a broken bound) is followed by a new session."""

    def __init__(self, address: str) -> None:
        from raw_client import (
            RawClient,  # (tests/ is on the path of both users of this module)
        )

        self.raw = RawClient(address)
        self.markers = itertools.count(10**12)
        self.sessions = 0
        self.start_session()

    def start_session(self) -> None:
        header = self.raw.hello()
        assert header[0] == Msg.WELCOME, f"the daemon did not admit the fuzzer: {header}"
        self.sessions += 1
        for handle in range(1, HANDLES + 1):
            self.raw.put(handle, torch.arange(4.0) + handle)

    def send(self, *messages: tuple[bytes, list[bytes]]) -> None:
        """Send ``messages`` (header, frames) and wait until the daemon has handled them."""
        for header, frames in messages:
            self.raw.send_raw(header, frames)
        marker = next(self.markers)
        self.raw.send([Msg.BATCH, marker, [[Cmd.SYNC]], True])
        while True:
            reply, _ = self.raw.receive()
            if reply[0] == Msg.REPLY and reply[1] == marker:
                break
        if reply[3] is not None and reply[3][0] == "session":
            self.start_session()

