"""Hostile input: whatever a peer sends, the daemon neither dies nor hangs, and what one session
may make it hold is bounded.

Every field of every message is treated as hostile: these tests send, through a raw pyzmq DEALER
(:class:`RawClient`), values the libremote client never would (extension values where integers
belong, 1000-deep nesting, non-ASCII tokens, replies never read, streams that never ask for an
acknowledgement) to real daemon processes, and check that the offender gets a clear error (or
loses its session) while the daemon keeps serving everyone else.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
import zmq

from libremote_wire import codec, messages, torch_codec
from libremote_wire.messages import Cmd, Msg

from conftest import REPO, Daemon, client_connected_to
from helpers import pool_daemon, run_python, wait_for_log
from raw_client import REPLY_WAIT_S, RawClient

HANDLE = codec.handle_ext(1)
TENSOR = torch_codec.inline_tensor_ext(torch.ones(2))
DTYPE = torch_codec.dtype_ext(torch.float32)
ADD = [1, "aten::add.Tensor"]

#: A placeholder that :func:`pack_deep` replaces by DEPTH nested one-element arrays (msgpack's
#: packer refuses to nest that deep itself; its decoder accepts up to 1024 levels).
DEEP = "\x00deep\x00"
DEPTH = 1000


def pack_deep(header: Any, depth: int = DEPTH) -> bytes:
    """``header`` packed, with every :data:`DEEP` string replaced by ``depth`` nested arrays."""
    return codec.packb(header).replace(codec.packb(DEEP), b"\x91" * depth + b"\xc0")


class Restartable:
    """A daemon shared by a module's tests, started again if a test killed or hung it (so that
    on code where a finding kills or hangs the daemon, only that finding's tests fail)."""

    def __init__(self, *args: str) -> None:
        self.args = args
        self.server: Daemon | None = None

    def alive(self) -> Daemon:
        if self.server is not None and not self._answers(self.server):
            self.server.process.kill()
            self.server.stop()
            self.server = None
        if self.server is None:
            self.server = Daemon(*self.args)
        return self.server

    @staticmethod
    def _answers(server: Daemon) -> bool:
        if server.process.poll() is not None:
            return False
        with RawClient(server.address) as client:
            client.send([Msg.STATUS])
            return bool(client.socket.poll(int(REPLY_WAIT_S * 1000), zmq.POLLIN))

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


TENANTS_TOML = """
[admin]
token = "admin-secret"

[tenants.research]
token = "research-secret"
"""


@pytest.fixture(scope="module")
def _plain():
    holder = Restartable()
    yield holder
    holder.stop()


@pytest.fixture(scope="module")
def _with_tenants(tmp_path_factory):
    path = tmp_path_factory.mktemp("tenants") / "tenants.toml"
    path.write_text(TENANTS_TOML)
    holder = Restartable("--tenants", str(path))
    yield holder
    holder.stop()


@pytest.fixture
def server(_plain) -> Daemon:
    return _plain.alive()


@pytest.fixture
def tenants(_with_tenants) -> Daemon:
    return _with_tenants.alive()


def assert_serving(server: Daemon, **hello: Any) -> None:
    """The daemon is alive and a new session computes exactly."""
    assert server.process.poll() is None, f"the daemon died:\n{server.log()[-4000:]}"
    with RawClient(server.address) as client:
        header = client.hello(**hello)
        assert header[0] == Msg.WELCOME, header
        client.put(1, torch.tensor([1.0, 2.0]))
        assert client.fetch(1).tolist() == [1.0, 2.0]


def protocol_error(header: Any) -> str:
    assert header[0] == Msg.REPLY, header
    error = header[3]
    assert error is not None and error[0] == "protocol", header
    return error[2]


def status_of(address: str) -> dict[str, Any]:
    with RawClient(address) as client:
        client.send([Msg.STATUS])
        header, _ = client.receive()
    assert header[0] == Msg.STATUS, header
    return header[1]


# ------------------------------------------------------------------------------------------------
# One unauthenticated message must not kill the daemon
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seq", [HANDLE, TENSOR, DTYPE, "7", 1.5, [1], {"a": 1}, True],
                         ids=["handle", "tensor", "dtype", "str", "float", "list", "map", "bool"])
def test_a_batch_seq_that_is_not_an_integer_is_a_protocol_error(server, seq):
    with RawClient(server.address) as raw:  # no HELLO: no session
        raw.send([Msg.BATCH, seq, [], True])
        header, _ = raw.receive()
        assert header[1] is None, header
        assert "seq" in protocol_error(header)
    assert_serving(server)


@pytest.mark.parametrize("hello", [False, True], ids=["no-session", "session"])
@pytest.mark.parametrize("want_reply", [TENSOR, HANDLE, 1, "yes", None],
                         ids=["tensor", "handle", "int", "str", "nil"])
def test_a_want_reply_that_is_not_a_boolean_is_a_protocol_error(server, want_reply, hello):
    with RawClient(server.address) as raw:
        if hello:
            assert raw.hello()[0] == Msg.WELCOME
        raw.send([Msg.BATCH, 3, [], want_reply])
        header, _ = raw.receive()
        assert header[1] == 3, header
        assert "want_reply" in protocol_error(header)
        if hello:  # the session goes on
            raw.put(2, torch.tensor([4.0]))
            assert raw.fetch(2).tolist() == [4.0]
    assert_serving(server)


def test_non_ascii_tokens_are_refused_without_harm(tenants):
    with RawClient(tenants.address) as raw:
        header = raw.hello(tenant="research", token="s\u00e9cret")
        assert header[0] == Msg.REFUSED, header
        assert "LIBREMOTE_TOKEN" in header[1]
    with RawClient(tenants.address) as raw:
        raw.send([Msg.ADMIN, {"token": "jeton-\u00fc", "tenant": "research", "weight": 2}])
        header, _ = raw.receive()
        assert header[0] == Msg.ADMIN and header[1]["ok"] is False, header
        assert "not allowed" in header[1]["message"]
    assert_serving(tenants, tenant="research", token="research-secret")


# ------------------------------------------------------------------------------------------------
# A peer that never reads its replies must not park the daemon
# ------------------------------------------------------------------------------------------------
#: STATUS requests the flooder sends without reading one reply: far more than the daemon's
#: per-peer outbox, the kernel's socket buffers and the flooder's one-message receive queue hold.
FLOOD = 30_000


def _send_or_fail(raw: RawClient, data: bytes) -> None:
    while True:
        try:
            raw.socket.send(data, zmq.NOBLOCK)
            return
        except zmq.Again:
            if not raw.socket.poll(int(REPLY_WAIT_S * 1000), zmq.POLLOUT):
                raise AssertionError(f"the daemon read nothing for {REPLY_WAIT_S} s: it hangs") from None


def test_a_peer_that_reads_no_replies_loses_its_session_and_nobody_else_notices(server):
    flooder = RawClient(server.address, options={zmq.RCVHWM: 1, zmq.RCVBUF: 4096})
    try:
        assert flooder.hello()[0] == Msg.WELCOME
        session = flooder.welcome["session"]
        request = codec.packb([Msg.STATUS])  # (to its worker: each gets a protocol error back)
        for _ in range(FLOOD):
            _send_or_fail(flooder, request)
        # Meanwhile (and after) another client is answered; the flooder loses its session.
        closed = f"session {session} closed ("
        deadline = time.monotonic() + 60
        while closed not in server.log():
            assert time.monotonic() < deadline, f"the flooder kept its session:\n{server.log()[-3000:]}"
            status_of(server.address)
            time.sleep(0.1)
        # Whichever comes first: its queue of unread replies fills, ZeroMQ's heartbeat gives up on
        # a peer that reads nothing (its engine stops reading, so it answers no heartbeat), or the
        # worker's own heartbeat timeout (the peer sends no PING).
        why = server.log().split(closed, 1)[1].splitlines()[0]
        assert any(word in why for word in ("replies", "disconnected", "silent")), why
        assert session not in [row["session"] for row in status_of(server.address)["sessions"]]
    finally:
        flooder.close()  # gone for good: the daemon must not care
    assert_serving(server)


# ------------------------------------------------------------------------------------------------
# Nesting: no decoded value is walked without a bound
# ------------------------------------------------------------------------------------------------
#: Batches with a 1000-deep value somewhere; True: the value is used, so the reply has an error
#: (False: the daemon skips it harmlessly, as FREE skips entries that are not handles).
DEEP_BATCHES = {
    "op args": ([[Cmd.OP, ADD, [DEEP, DEEP], {}, [9]]], True),
    "op kwargs": ([[Cmd.OP, ADD, [HANDLE, HANDLE], {"alpha": DEEP}, [9]]], True),
    "failing op outs": ([[Cmd.OP, ADD, [codec.handle_ext(404), codec.handle_ext(404)], {}, [DEEP]]], True),
    "op outs": ([[Cmd.OP, ADD, [HANDLE, HANDLE], {}, [DEEP]]], True),
    "a command": ([DEEP], True),
    "a command's tail": ([[Cmd.OP, ADD, [HANDLE, HANDLE], {}, [9], DEEP]], True),
    "op name": ([[Cmd.OP, [1, DEEP], [HANDLE, HANDLE], {}, [9]]], True),
    "op sync args": ([[Cmd.OP_SYNC, ADD, [DEEP, DEEP], {}, [9]]], True),
    "free": ([[Cmd.FREE, [DEEP]]], False),
    "program": ([[Cmd.PROGRAM, 1, [[Cmd.OP, ADD, [HANDLE, HANDLE], {}, [DEEP]]]]], True),
    "graph node": ([[Cmd.GRAPH, 1, 1, [["aten::add.Tensor", [codec.value_ext(0), DEEP], {}]],
                     [codec.value_ext(1)]]], True),
    "settings": ([[Cmd.SETTINGS, {"allow_tf32": DEEP}]], True),
    "query": ([[Cmd.QUERY, "memory_fraction", DEEP]], True),
    "seed": ([[Cmd.SEED, 1, DEEP]], True),
    "fetch": ([[Cmd.FETCH, DEEP]], True),
}


@pytest.mark.parametrize("commands, fails", DEEP_BATCHES.values(), ids=DEEP_BATCHES.keys())
def test_deeply_nested_values_get_an_error_and_the_session_goes_on(server, commands, fails):
    with RawClient(server.address) as raw:
        assert raw.hello()[0] == Msg.WELCOME
        raw.put(1, torch.tensor([1.0, 2.0]))
        raw.send_raw(pack_deep([Msg.BATCH, 5, commands, True]))
        header, frames = raw.receive()
        assert header[0] == Msg.REPLY and header[1] == 5, header
        assert (header[3] is not None) == fails, f"a {DEPTH}-deep value: {header}"
        assert frames == []
        raw.call([[Cmd.SYNC]])  # (takes an error the failed op may have left for the next reply)
        # The session goes on, with its tensor intact.
        raw.put(3, torch.tensor([5.0]))
        assert raw.fetch(1).tolist() == [1.0, 2.0]
        assert raw.fetch(3).tolist() == [5.0]
    assert_serving(server)


def test_deep_nesting_in_op_arguments_is_a_protocol_error(server):
    with RawClient(server.address) as raw:
        assert raw.hello()[0] == Msg.WELCOME
        raw.send_raw(pack_deep([Msg.BATCH, 5, DEEP_BATCHES["op args"][0], True]))
        header, _ = raw.receive()
        assert "nest" in protocol_error(header)
    assert_serving(server)


@pytest.mark.parametrize("message", [
    [Msg.HELLO, {"protocol": messages.PROTOCOL_VERSION, "host": DEEP}],
    [Msg.HELLO, {"protocol": DEEP}],
    [Msg.ADMIN, {"session": DEEP, "weight": 2}],
    [Msg.ADMIN, {"tenant": "x", "memory_quota": DEEP}],
    [Msg.BATCH, DEEP, [], True],
    [Msg.STATUS, DEEP],
    [Msg.PING, DEEP],
], ids=["hello-field", "hello-protocol", "admin-session", "admin-quota", "batch-seq", "status", "ping"])
def test_deep_nesting_in_session_less_messages_does_no_harm(server, message):
    with RawClient(server.address) as raw:
        raw.send_raw(pack_deep(message))
        if message[0] != Msg.PING:
            header, _ = raw.receive()
            assert header[0] in (Msg.REFUSED, Msg.ADMIN, Msg.REPLY, Msg.STATUS), header
            if header[0] == Msg.ADMIN:
                assert header[1]["ok"] is False, header
    assert_serving(server)


# ------------------------------------------------------------------------------------------------
# HELLO's info: checked on arrival, only sanitized copies kept
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("pid", HANDLE), ("pid", "123"), ("host", TENSOR), ("torch", DTYPE), ("argv", "x" * 2_000),
    ("libremote", [1, 2]), ("tenant", {"a": 1}), ("priority", 3), ("devices", "2"), ("python", 3.11),
])
def test_hello_info_fields_are_checked_on_arrival(server, field, value):
    with RawClient(server.address) as raw:
        header = raw.hello(**{field: value})
        assert header[0] == Msg.REFUSED, header
        assert field in header[1], header
    # STATUS reports every session's client info: it must still pack.
    status_of(server.address)
    assert_serving(server)


def test_unknown_hello_fields_are_dropped(server):
    with RawClient(server.address) as raw:
        assert raw.hello(extra=HANDLE, nested={"a": [TENSOR]})[0] == Msg.WELCOME
        session = raw.welcome["session"]
        rows = [row for row in status_of(server.address)["sessions"] if row["session"] == session]
        assert rows and rows[0]["host"] == "raw-test-client", rows


# ------------------------------------------------------------------------------------------------
# Bounds: frames, sessions, streams, handles
# ------------------------------------------------------------------------------------------------
def test_default_bounds_are_finite_and_documented():
    from libremote_server.cli import build_parser

    defaults = build_parser().parse_args([])
    assert defaults.max_message_size <= codec.MAX_HEADER_BYTES, defaults.max_message_size
    assert isinstance(defaults.max_sessions, int) and defaults.max_sessions > 0, defaults.max_sessions
    readme = (REPO / "README.md").read_text()
    for option in ("--max-message-size", "--max-sessions", "--max-handles"):
        assert option in readme, option


def test_the_real_client_never_sends_a_frame_over_the_piece_size():
    """Uploads of any layout and shape go in pieces, so a daemon whose frame limit is just
    above one piece serves them exactly."""
    with pool_daemon("--max-message-size", "9MiB") as server, client_connected_to(server.address):
        channels_last = torch.randn(5, 64, 128, 128).to(memory_format=torch.channels_last)  # 20 MiB
        remote = channels_last.to("cuda")
        assert remote.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(remote.cpu(), channels_last)
        row = torch.randn(1, 5 << 20)  # 20 MiB, broadcast into a (2, N) destination
        destination = torch.zeros(2, 5 << 20, device="cuda")
        destination.copy_(row)
        assert torch.equal(destination.cpu(), row.expand(2, -1))
        transposed = torch.zeros(5 << 20, 1, device="cuda").t()
        transposed.copy_(row)
        assert torch.equal(transposed.cpu(), row)


def test_streaming_past_the_window_without_asking_for_a_reply_ends_the_session(server):
    from libremote_server import limits

    with RawClient(server.address) as raw:
        assert raw.hello()[0] == Msg.WELCOME
        session = raw.welcome["session"]
        for _ in range(limits.MAX_UNACKNOWLEDGED_BATCHES + 1):
            raw.batch([], want_reply=False)
        message = protocol_error(raw.receive()[0])
        assert "acknowledg" in message, message
        _, error, _ = raw.call([[Cmd.SYNC]])
        assert error[0] == "session", error
    wait_for_log(server, f"session {session} closed (")
    assert_serving(server)


def test_streaming_too_many_bytes_without_asking_for_a_reply_ends_the_session(server):
    from libremote_server import limits

    piece = bytes(4 << 20)
    with RawClient(server.address) as raw:
        assert raw.hello()[0] == Msg.WELCOME
        for _ in range(limits.MAX_UNACKNOWLEDGED_BYTES // len(piece) + 1):
            raw.batch([], [piece], want_reply=False)
        message = protocol_error(raw.receive()[0])
        assert "acknowledg" in message, message
    assert_serving(server)


def test_a_client_queueing_batches_faster_than_they_run_loses_its_session(server):
    """Asking for a reply on every batch resets the stream window, but not the bound on batches
    queued: each of these runs a matrix product, and they arrive far faster than they run."""
    from libremote_server import limits

    with RawClient(server.address) as raw:
        assert raw.hello()[0] == Msg.WELCOME
        session = raw.welcome["session"]
        raw.put(1, torch.randn(320, 320))
        product = [[Cmd.OP, ADD, [HANDLE, HANDLE], {}, None], [Cmd.OP, [2, "aten::mm"], [HANDLE, HANDLE], {}, None]]
        for _ in range(3 * limits.MAX_QUEUED_BATCHES):
            raw.batch(product)
        while True:  # replies of the batches that ran, then the protocol error that ended it
            header, _ = raw.receive()
            if header[3] is not None:
                break
        assert "queued" in protocol_error(header), header
    wait_for_log(server, f"session {session} closed (")
    assert_serving(server)


def test_a_real_client_streaming_far_past_the_window_waits_and_computes_exactly(server):
    from libremote_server import limits

    steps = 3 * limits.MAX_UNACKNOWLEDGED_BATCHES
    result = run_python("stream_past_the_window.py", timeout=120, LIBREMOTE_SERVER=server.address, LIBREMOTE_BATCH="1",
                        STEPS=str(steps))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [f"[{steps}.0,", f"{steps}.0,", f"{steps}.0,", f"{steps}.0]", "255", "True"], result.stdout


def test_handles_per_session_are_capped():
    with pool_daemon("--max-handles", "64") as server, RawClient(server.address) as raw:
        assert raw.hello()[0] == Msg.WELCOME
        for handle in range(1, 65):
            raw.put(handle, torch.tensor([float(handle)]))
        results, error, _ = raw.call([[Cmd.PUT, 65, DTYPE, [1], [1], 0, 1]],
                                     [bytes(torch_codec.tensor_bytes(torch.tensor([65.0])))])
        assert error is not None and error[0] == "oom" and "--max-handles" in error[2], error
        raw.call([[Cmd.FREE, [1]]])
        raw.put(65, torch.tensor([65.0]))  # room again
        assert raw.fetch(65).tolist() == [65.0]
        assert_serving(server)
