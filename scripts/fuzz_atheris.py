"""Coverage-guided fuzzing of what the daemon does with a message's bytes, with atheris (libFuzzer
for Python): the decoder, the declared message fields (libremote_wire.messages), and a worker
session's command handlers, all in this process so that libFuzzer sees which branches each input
reaches.

    pip install atheris
    python scripts/fuzz_atheris.py -max_total_time=600          # (any libFuzzer flag)
    python scripts/fuzz_atheris.py -runs=200000 corpus/         # keep what it finds in corpus/

A finding is an exception other than the ones the daemon answers with (ProtocolError for a
malformed message, PolicyError for a refused field, LimitExceeded for a broken bound): the daemon
would still survive it (its catch-all ends the sender's session), but it is a bug to fix. The
session runs on the CPU with a 64 MiB quota, so no input can make this process allocate much.
tests/test_fuzz.py (hypothesis, CI-sized) and scripts/fuzz_daemon.py (a real daemon over a
socket, 1M messages) are the other two fuzzers; this one finds deep paths they reach by luck.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402  (not instrumented: torch is not what is under test)

with atheris.instrument_imports(include=["libremote_wire", "libremote_server"]):
    from libremote_server import limits
    from libremote_server.policy import PolicyError, Tenant
    from libremote_server.worker.session import Session
    from libremote_wire import codec, messages, torch_codec
    from libremote_wire.messages import Msg

torch.set_grad_enabled(False)  # (this process plays a worker: no client code is loaded)

ANSWERED = (codec.ProtocolError, PolicyError, limits.LimitExceeded)
_session: Session | None = None


def session() -> Session:
    """One session for the whole run, with a few tensors for commands to name; replaced when an
    input ends it (a broken bound)."""
    global _session
    if _session is None:
        _session = Session("fuzz", [torch.device("cpu")], {}, tenant=Tenant("fuzz", None, 64 << 20))
        for handle in range(1, 5):
            _session._store(handle, torch.arange(4.0) + handle)
    return _session


def one_input(data: bytes) -> None:
    global _session
    split = data.find(b"\0\0\0\0")  # an optional frame after the header
    header_bytes, frames = (data, []) if split < 0 else (data[:split], [data[split + 4:]])
    try:
        header = torch_codec.unpackb(header_bytes)
        if not isinstance(header, list) or not header or not isinstance(header[0], int):
            return
        kind, fields = messages.parse(header, messages.MESSAGES)
        if kind == Msg.HELLO:
            messages.HELLO_INFO.parse(fields[0])
        elif kind == Msg.ADMIN:
            messages.ADMIN_REQUEST.parse(fields[0])
        elif kind == Msg.STATUS and fields[0] is not None:
            messages.STATUS_CREDENTIALS.parse(fields[0])
        elif kind == Msg.BATCH:
            seq, commands, want_reply = fields
            target = session()
            target.enqueue(seq, commands, frames, want_reply)
            while target.has_work():
                for reply in target.run_slice(64):
                    codec.packb([Msg.REPLY, reply.seq, reply.results, reply.error])
    except limits.LimitExceeded:
        _session = None
    except ANSWERED:
        pass


def seed_messages() -> list[bytes]:
    """Well-formed messages to start from (libFuzzer mutates what it has): an op on the session's
    tensors, uploads, fetches, frees, a graph, a recorded step, settings and the field checks."""
    handle = codec.handle_ext
    f32 = torch_codec.dtype_ext(torch.float32)
    batches = [
        [[0, [1, "aten::add.Tensor"], [handle(1), handle(2)], {}, [9]], [3, 9], [4, [9]]],
        [[1, [2, "aten::view.default"], [handle(1), [2, 2]], {}, [10]], [5]],
        [[11, 11, f32, [4], [1], 0, 1], [2, 11, f32, [4], 1], [3, 11]],
        [[12, 1, 1, [["aten::mul.Tensor", [codec.value_ext(0), codec.value_ext(0)], {}]],
          [codec.value_ext(1)]], [13, 1, [handle(1)], [12]]],
        [[14, 1, [[0, [3, "aten::neg.default"], [handle(1)], {}, [13]]]], [15, 1]],
        [[16, {"allow_tf32": True}], [10, "memory"], [6, 7], [7, codec.device_ext(0)]],
    ]
    seeds = [codec.packb([Msg.BATCH, seq, commands, True]) for seq, commands in enumerate(batches)]
    seeds[2] += b"\0\0\0\0" + bytes(16)  # the upload's frame
    seeds.append(codec.packb([Msg.HELLO, {"protocol": messages.PROTOCOL_VERSION, "pid": 1, "tenant": "a"}]))
    seeds.append(codec.packb([Msg.ADMIN, {"token": "t", "tenant": "a", "weight": 2}]))
    seeds.append(codec.packb([Msg.STATUS, {"tenant": "a", "tenant_token": "b"}]))
    return seeds


def main() -> None:
    corpus = [Path(arg) for arg in sys.argv[1:] if not arg.startswith("-")]
    for folder in corpus:  # an empty corpus folder starts from the seeds
        if folder.is_dir() and not any(folder.iterdir()):
            for index, seed in enumerate(seed_messages()):
                (folder / f"seed-{index}").write_bytes(seed)
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
