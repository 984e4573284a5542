"""Faults: the daemon is a security boundary, and every failure must give a clear error.

Everything here runs against real daemon processes. Some tests talk to the daemon through a raw
pyzmq DEALER socket (:class:`RawClient`) to send what the libremote client never would: garbage,
forged handles, refused ops, wrong versions. Others run a client in a fresh interpreter so that
environment variables, a missing daemon or a killed process can be exercised; the subprocess
timeouts there are generous upper bounds that prove "no hang", not performance checks.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from typing import Any

import msgpack
import pytest
import torch

from libremote_wire import codec, messages, torch_codec
from libremote_wire.messages import Cmd, Msg

from conftest import REPO, Daemon, client_connected_to, free_port, subprocess_env
from helpers import (
    finish,
    last_json,
    run_python,
    spawn_client,
    wait_for_file,
    wait_for_log,
)
from raw_client import RawClient


def _float_bytes(*values: float) -> bytes:
    return bytes(torch_codec.tensor_bytes(torch.tensor(values, dtype=torch.float32)))


F32 = torch_codec.dtype_ext(torch.float32)


# ------------------------------------------------------------------------------------------------
# 1. Daemon unreachable / not configured
# ------------------------------------------------------------------------------------------------
def test_unreachable_daemon_raises_connection_failed_quickly():
    port = free_port()  # nobody listens here
    address = f"tcp://127.0.0.1:{port}"
    result = run_python("use_an_unreachable_daemon.py", timeout=30, LIBREMOTE_SERVER=address, LIBREMOTE_TIMEOUT="2")
    assert result.returncode == 0, result.stderr
    report = last_json(result.stdout)
    first = report["first"]
    assert first["type"] == "ConnectionFailed", report
    assert address in first["message"]
    assert "libremote-server" in first["message"]
    assert "LIBREMOTE_TIMEOUT" in first["message"]
    assert report["second"]["type"] == "ConnectionFailed", report
    assert address in report["second"]["message"]


def test_unreachable_daemon_is_available_false_with_warning():
    address = f"tcp://127.0.0.1:{free_port()}"
    result = run_python("is_available_without_a_daemon.py", timeout=30, LIBREMOTE_SERVER=address, LIBREMOTE_TIMEOUT="2")
    assert result.returncode == 0, result.stderr
    report = last_json(result.stdout)
    assert report["available"] is False
    assert report["count"] == 0
    assert any(address in text for text in report["warnings"]), report


def test_no_address_configured_gives_clear_error():
    result = run_python("use_cuda_without_an_address.py", timeout=30)  # subprocess_env() removes LIBREMOTE_SERVER
    assert result.returncode == 0, result.stderr
    report = last_json(result.stdout)
    assert report.get("type") == "NotConfiguredError", report
    assert "LIBREMOTE_SERVER" in report["message"]
    assert "libremote.connect" in report["message"]
    assert report["available"] is False
    assert any("LIBREMOTE_SERVER" in text for text in report["warnings"]), report


# ------------------------------------------------------------------------------------------------
# 2. A remote op failure surfaces at the next sync point; the session stays usable
# ------------------------------------------------------------------------------------------------
def test_remote_op_failure_surfaces_at_next_sync_point(remote):
    x = torch.arange(6.0).cuda()
    idx = torch.tensor([0, 10]).cuda()
    y = torch.index_select(x, 0, idx)  # local shape inference passes; the daemon raises
    assert y.shape == (2,)
    z = y * 2  # streams after the failure
    with pytest.raises(remote.RemoteOpError) as info:
        z.sum().item()
    error = info.value
    assert isinstance(error, RuntimeError)
    assert error.kind == "op"
    assert "index_select" in str(error)
    assert "index_select" in error.op
    assert "out of range" in str(error) or "index" in str(error).lower()

    # The session is still usable.
    assert (x + 1).sum().item() == 21.0
    assert torch.equal(torch.index_select(x, 0, torch.tensor([5, 0]).cuda()).cpu(), torch.tensor([5.0, 0.0]))

    # Tensors computed from the failed op raise again when read, naming the original failure.
    for tensor in (y, z):
        with pytest.raises(remote.RemoteOpError) as again:
            tensor.cpu()
        assert "never computed" in str(again.value)
        assert "index_select" in str(again.value)
    # ... and so do new ops on them, at their own sync point.
    w = z + 1
    with pytest.raises(remote.RemoteOpError, match="never computed.*index_select"):
        w.cpu()
    assert (x * 2).sum().item() == 30.0


def test_remote_op_failure_with_advanced_indexing(remote):
    x = torch.arange(6.0).cuda()
    idx = torch.tensor([1, 7]).cuda()
    with pytest.raises(remote.RemoteOpError) as info:
        x[idx].cpu()
    assert "index" in str(info.value)
    assert "out of" in str(info.value)  # "out of bounds" / "out of range"
    assert x[torch.tensor([1, 5]).cuda()].tolist() == [1.0, 5.0]


def test_remote_op_failure_at_synchronize(remote):
    x = torch.arange(4.0).cuda()
    torch.index_select(x, 0, torch.tensor([4]).cuda())
    with pytest.raises(remote.RemoteOpError, match="index_select"):
        torch.cuda.synchronize()
    torch.cuda.synchronize()  # the error was reported once; nothing pending now
    assert x.sum().item() == 6.0


# ------------------------------------------------------------------------------------------------
# 3. LIBREMOTE_SYNC=1: the failing op raises on its own line
# ------------------------------------------------------------------------------------------------
def test_sync_mode_raises_on_the_failing_line(daemon):
    result = run_python("failing_op_in_sync_mode.py", timeout=60, LIBREMOTE_SERVER=daemon.address, LIBREMOTE_SYNC="1")
    assert result.returncode == 0, result.stderr
    report = last_json(result.stdout)
    assert report.get("type") == "RemoteOpError", report
    assert report["stage"] == "op", report
    assert "index_select" in report["message"]
    assert report["after"] == 21.0


# ------------------------------------------------------------------------------------------------
# 4. Refused ops
# ------------------------------------------------------------------------------------------------
def test_from_file_on_cuda_is_refused(remote, tmp_path):
    path = tmp_path / "secret.bin"
    secret = torch.tensor([1234.5, -42.0, 7.25, 99.0], dtype=torch.float32)
    path.write_bytes(bytes(torch_codec.tensor_bytes(secret)))
    with pytest.raises(remote.RemoteOpError) as info:
        t = torch.from_file(str(path), size=4, device="cuda")
        t.cpu()
    assert info.value.kind == "refused"
    assert "from_file" in str(info.value)
    assert "refused" in str(info.value)
    assert "1234" not in str(info.value)

    with pytest.raises(remote.RemoteOpError) as info:
        t = torch.ops.aten.from_file(str(path), size=4, dtype=torch.float32, device=torch.device("cuda"))
        t.cpu()
    assert info.value.kind == "refused"
    assert "from_file" in str(info.value)
    # Still usable.
    assert torch.ones(3, device="cuda").sum().item() == 3.0


def test_from_file_never_opens_the_file_on_the_daemon(own_daemon, tmp_path):
    """A FIFO: opening it for reading would block (and register a reader, which we can detect)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    result = run_python("from_file_on_cuda.py", timeout=60, LIBREMOTE_SERVER=own_daemon.address, FILE=str(fifo))
    assert result.returncode == 0, result.stderr
    report = last_json(result.stdout)
    assert report.get("kind") == "refused", report
    assert report["after"] == 2.0
    # Nobody holds the FIFO open for reading: opening it for writing without blocking fails.
    with pytest.raises(OSError) as info:
        os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    assert info.value.errno == errno.ENXIO
    assert own_daemon.process.poll() is None


@pytest.mark.parametrize(
    "name, args, kwargs",
    [
        ("aten::from_file", ["/etc/passwd"], {"size": 4}),
        ("prims::add", [], {}),
        ("prims::empty_strided", [[2], [1]], {}),
        ("torchvision::nms", [], {}),
        ("os::system", ["true"], {}),
        ("aten::_print", ["hello from a client"], {}),
        ("aten::_unsafe_index.Tensor", [], {}),
        ("aten::_assert_async", [], {}),
        ("aten::_test_warn_in_autograd", [], {}),
        ("aten::__import__", [], {}),
        ("builtins.eval", [], {}),
        ("", [], {}),
        ("aten::does_not_exist", [], {}),
    ],
)
def test_raw_refused_op_names(raw, name, args, kwargs):
    results, error, _ = raw.call([[Cmd.OP, [1, name], args, kwargs, [1]]])
    assert results == []
    assert error is not None, f"{name} ran"
    assert error[0] == "refused", error
    # The refusal sticks to the op id: using it again is refused again (not run, not unknown).
    results, error, _ = raw.call([[Cmd.OP_SYNC, 1, args, kwargs, [2]]])
    assert results == [None]
    assert error is not None and error[0] == "refused", error
    # Outputs of a refused op are poisoned, not silently missing.
    results, error, frames = raw.call([[Cmd.FETCH, 1]])
    assert results == [None] and frames == []
    assert error[0] == "handle" and "never computed" in error[2], error


def test_raw_refused_from_file_reports_reason(raw):
    results, error, _ = raw.call([[Cmd.OP_SYNC, [1, "aten::from_file"], ["/etc/passwd"], {"size": 4}, [1]]])
    assert results == [None]
    kind, op, message = error
    assert kind == "refused"
    assert "from_file" in op
    assert "refused" in message or "not allowed" in message


# ------------------------------------------------------------------------------------------------
# 5. A raw ZeroMQ client sending malformed or hostile messages
# ------------------------------------------------------------------------------------------------
def _assert_protocol_error(header: Any, seq: Any = None) -> str:
    assert header[0] == Msg.REPLY, header
    if seq is not None:
        assert header[1] == seq, header
    assert header[2] == [], header
    error = header[3]
    assert error is not None and error[0] == "protocol", header
    return error[2]


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xc1\xc1\xc1garbage",
        b"",
        b"\x92\x04",  # truncated array
        b"\xdd\xff\xff\xff\xff",  # array of 4 billion elements, no data
        b"\xc7\x05\x01abc",  # truncated extension
        msgpack.packb([Msg.BATCH, 1, [[Cmd.FETCH, msgpack.ExtType(1, b"\x01")]], True]),  # bad handle ext
        msgpack.packb([Msg.BATCH, 1, [[Cmd.OP, [1, "aten::add.Tensor"], [msgpack.ExtType(99, b"x")], {}, [1]]], True]),
        msgpack.packb([Msg.BATCH, 1, [[Cmd.PUT, 1, msgpack.ExtType(2, b"float99"), [1], [1], 0, 1]], True]),
        random.Random(0).randbytes(256),
    ],
)
def test_garbage_header_gets_protocol_error_and_daemon_keeps_serving(raw, remote, garbage):
    raw.send_raw(garbage)
    header, frames = raw.receive()
    _assert_protocol_error(header)
    assert frames == []
    # The same raw session still works ...
    raw.put(1, torch.tensor([1.0, 2.0]))
    assert raw.fetch(1).tolist() == [1.0, 2.0]
    # ... and so does a normal client.
    assert (torch.arange(3.0, device="cuda") * 2).sum().item() == 6.0


@pytest.mark.parametrize(
    "header, expected",
    [
        ({"kind": Msg.BATCH}, "header must be an array"),
        (42, "header must be an array"),
        ("BATCH", "header must be an array"),
        ([], "header must be an array"),
        (["BATCH", 1, [], True], "header must be an array"),
        ([99], "unknown message kind 99"),
        ([Msg.WELCOME, {}], "unknown message kind"),
        ([Msg.REPLY, 1, [], None], "unknown message kind"),
        ([-1], "unknown message kind"),
        ([Msg.BATCH, 1, []], "BATCH is"),
        ([Msg.BATCH, 1, [], True, None, "extra"], "BATCH is"),
        ([Msg.BATCH, 1, [], True, "not a list"], "striped must be a list"),
        ([Msg.BATCH, 1, "not a list", True], "commands must be a list"),
        ([Msg.BATCH, 1, [[77]], True], "unknown command kind 77"),
        ([Msg.BATCH, 1, [[-3]], True], "unknown command kind"),
        ([Msg.BATCH, 1, [[]], True], "malformed command"),
        ([Msg.BATCH, 1, ["FETCH"], True], "malformed command"),
        ([Msg.BATCH, 1, [[Cmd.OP, [1, "aten::add.Tensor"], []]], True], "OP takes"),
        ([Msg.BATCH, 1, [[Cmd.OP, [1, "aten::add.Tensor"], [], {}, [1], "extra"]], True], "OP takes"),
        ([Msg.BATCH, 1, [[Cmd.OP_SYNC, [1, "aten::add.Tensor"]]], True], "OP takes"),
        ([Msg.BATCH, 1, [[Cmd.OP, 12345, [], {}, [1]]], True], "never defined"),
        ([Msg.BATCH, 1, [[Cmd.OP, [1, "aten::add.Tensor"], "args", {}, [1]]], True], "args must be a list"),
        ([Msg.BATCH, 1, [[Cmd.FETCH]], True], "FETCH takes"),
        ([Msg.BATCH, 1, [[Cmd.FREE, 3]], True], "FREE takes"),
        ([Msg.BATCH, 1, [[Cmd.SEED, "x"]], True], "SEED takes"),
        ([Msg.BATCH, 1, [[Cmd.QUERY, 5]], True], "QUERY takes"),
        ([Msg.BATCH, 1, [[Cmd.PUT, 1, None, [1], [1], 0, 1]], True], "PUT needs"),
        ([Msg.BATCH, 1, [[Cmd.UPLOAD, 1, None, [1], 1]], True], "UPLOAD needs"),
        ([Msg.HELLO], "HELLO is"),
        ([Msg.HELLO, "hi"], "HELLO is"),
    ],
)
def test_malformed_messages_get_protocol_errors(raw, header, expected):
    raw.send(header)
    reply, frames = raw.receive()
    message = _assert_protocol_error(reply)
    assert expected in message, message
    assert frames == []
    # The session survives a malformed message.
    raw.put(5, torch.tensor([3.0]))
    assert raw.fetch(5).tolist() == [3.0]


def test_protocol_error_reply_carries_the_batch_seq(raw):
    seq = raw.batch([[Cmd.OP, [1, "aten::add.Tensor"], []]])
    reply, _ = raw.receive()
    _assert_protocol_error(reply, seq)


def test_forged_handles_from_another_session_are_never_served(remote, raw):
    # Session A (this process's libremote client) owns tensors with known contents.
    secret_values = [31337.0, -2718.0, 1618.0]
    secret = torch.tensor(secret_values).cuda()
    other = (secret * 3).cuda()
    assert secret.cpu().tolist() == secret_values  # both exist on the daemon now
    assert other.sum().item() == sum(secret_values) * 3
    a_handles = {secret._ref.id, other._ref.id}
    candidates = sorted(set(range(1, 51)) | a_handles)

    for handle in candidates:
        # FETCH: must answer an error, never bytes.
        results, error, frames = raw.call([[Cmd.FETCH, handle]])
        assert frames == [], f"FETCH {handle} returned data"
        assert results == [None]
        assert error is not None and error[0] == "handle", (handle, error)
        assert "does not belong to this session" in error[2]

        # OP_SYNC using A's handle as input.
        results, error, frames = raw.call(
            [[Cmd.OP_SYNC, [1, "aten::add.Tensor"], [codec.handle_ext(handle), codec.handle_ext(handle)], {}, [10_000 + handle]]]
        )
        assert frames == []
        assert results == [None], (handle, results)
        assert error is not None and error[0] == "handle", (handle, error)
        assert "does not belong to this session" in error[2]
        assert "add" in error[1]

        # OP_SYNC returning a value (no new tensor): aten::_local_scalar_dense = .item().
        results, error, _ = raw.call(
            [[Cmd.OP_SYNC, [2, "aten::_local_scalar_dense"], [codec.handle_ext(handle)], {}, [None]]]
        )
        assert results == [None], (handle, results)
        assert error is not None and error[0] == "handle", (handle, error)

        # UPLOAD into A's handle: refused, A's data unchanged (checked below).
        results, error, _ = raw.call([[Cmd.UPLOAD, handle, F32, [3], 1]], [_float_bytes(0.0, 0.0, 0.0)])
        assert error is not None and error[0] == "handle", (handle, error)

    # Session B frees "A's" handles and tries in-place ops on them: A must not notice.
    raw.call([[Cmd.FREE, candidates]])
    results, error, _ = raw.call(
        [[Cmd.OP, [3, "aten::zero_"], [codec.handle_ext(h)], {}, [None]] for h in candidates]
    )
    assert error is not None and error[0] == "handle", error
    assert secret.cpu().tolist() == secret_values
    assert other.cpu().tolist() == [v * 3 for v in secret_values]
    assert (secret + other).sum().item() == sum(secret_values) * 4


def test_forged_handles_between_two_raw_sessions(daemon):
    with RawClient(daemon.address) as a, RawClient(daemon.address) as b:
        assert a.hello()[0] == Msg.WELCOME
        assert b.hello()[0] == Msg.WELCOME
        assert a.welcome["session"] != b.welcome["session"]
        a.put(7, torch.tensor([42.0, 43.0]))
        results, error, frames = b.call([[Cmd.FETCH, 7]])
        assert frames == [] and results == [None]
        assert error[0] == "handle" and "does not belong to this session" in error[2]
        # B may use the same handle number for its own tensor: the tables are separate.
        b.put(7, torch.tensor([-1.0]))
        assert b.fetch(7).tolist() == [-1.0]
        assert a.fetch(7).tolist() == [42.0, 43.0]


def test_upload_with_wrong_frame_length_is_a_protocol_error(raw):
    raw.put(1, torch.zeros(4))
    for frame in (b"", b"\x00" * 10, b"\x00" * 15, b"\x00" * 17, b"\x00" * 64):
        seq = raw.batch([[Cmd.UPLOAD, 1, F32, [4], 1]], [frame])
        reply, _ = raw.receive()
        message = _assert_protocol_error(reply, seq)
        assert "bytes" in message, message
    assert raw.fetch(1).tolist() == [0.0] * 4
    # UPLOAD naming a frame that does not exist.
    seq = raw.batch([[Cmd.UPLOAD, 1, F32, [4], 2]], [_float_bytes(1, 2, 3, 4)])
    _assert_protocol_error(raw.receive()[0], seq)
    seq = raw.batch([[Cmd.UPLOAD, 1, F32, [4], 0]], [_float_bytes(1, 2, 3, 4)])
    _assert_protocol_error(raw.receive()[0], seq)


@pytest.mark.parametrize("frame_bytes", [0, 4, 7, 9, 12, 100])
def test_put_with_wrong_frame_length_is_a_protocol_error(raw, frame_bytes):
    before = raw.memory()
    seq = raw.batch([[Cmd.PUT, 1, F32, [2], [1], 0, 1]], [b"\x01" * frame_bytes])
    message = _assert_protocol_error(raw.receive()[0], seq)
    assert "8 bytes" in message, message
    assert raw.memory()["allocated"] == before["allocated"]
    raw.put(1, torch.tensor([1.0, 2.0]))  # the handle was not taken by the failed PUT
    assert raw.fetch(1).tolist() == [1.0, 2.0]


@pytest.mark.parametrize(
    "shape, stride",
    [
        ([2], [10**12]),
        ([2, 2], [10**12, 1]),
        ([2], [-1]),
        ([-1], [1]),
        ([2], [1, 1]),
        ([2], [0]),  # overlapping: storage smaller than the frame
        ([1 << 40], [1]),  # dense, but the frame is tiny
        ([1 << 62, 1 << 62], [1 << 62, 1]),  # overflowing sizes
        ([2], [2**64 - 1]),  # does not fit in int64
        ([2], ["1"]),
    ],
)
def test_put_with_hostile_layout_is_refused_without_allocating(raw, daemon, shape, stride):
    before = raw.memory()
    seq = raw.batch([[Cmd.PUT, 1, F32, shape, stride, 0, 1]], [_float_bytes(1.0, 2.0)])
    reply, frames = raw.receive()
    message = _assert_protocol_error(reply, seq)
    assert message
    after = raw.memory()
    assert after["allocated"] == before["allocated"]
    assert after["handles"] == before["handles"]
    assert daemon.process.poll() is None


def test_hello_with_wrong_protocol_version_is_refused(daemon):
    with RawClient(daemon.address) as client:
        header = client.hello(protocol=messages.PROTOCOL_VERSION + 41, libremote="9.9.9")
        assert header[0] == Msg.REFUSED, header
        reason = header[1]
        assert f"protocol {messages.PROTOCOL_VERSION + 41}" in reason
        assert f"speaks {messages.PROTOCOL_VERSION}" in reason
        assert "9.9.9" in reason
        # Refused means no session: a batch gets a "session" error.
        results, error, _ = client.call([[Cmd.SYNC]])
        assert error[0] == "session", error
    with RawClient(daemon.address) as client:
        header = client.hello(protocol=None)
        assert header[0] == Msg.REFUSED, header
        assert "None" in header[1] and str(messages.PROTOCOL_VERSION) in header[1]


def test_library_client_reports_refusal(daemon):
    """The libremote client turns REFUSED into ConnectionFailed naming both versions."""
    result = run_python("connect_with_another_protocol_version.py", timeout=60, ADDRESS=daemon.address)
    assert result.returncode == 0, result.stderr
    message = last_json(result.stdout)["message"]
    assert "refused" in message
    assert "77" in message and f"speaks {messages.PROTOCOL_VERSION}" in message


def test_batch_before_hello_gets_session_error(daemon):
    with RawClient(daemon.address) as client:
        # No reply wanted: none comes; the next batch that wants one gets the session error.
        client.batch([[Cmd.FETCH, 1]], want_reply=False)
        seq = client.batch([[Cmd.FETCH, 1]])
        header, frames = client.receive()
        assert header[0] == Msg.REPLY
        assert header[1] == seq, header
        assert header[2] == [] and frames == []
        kind, _, message = header[3]
        assert kind == "session"
        assert "reconnect" in message


def test_batch_after_bye_gets_session_error(daemon):
    with RawClient(daemon.address) as client:
        assert client.hello()[0] == Msg.WELCOME
        client.put(1, torch.tensor([5.0]))
        client.send([Msg.BYE])
        results, error, frames = client.call([[Cmd.FETCH, 1]])
        assert frames == []
        assert error[0] == "session", error


def test_oversized_header_is_refused():
    """(By default --max-message-size equals the header limit: ZeroMQ cuts a peer that sends
    more before the daemon sees it. With a larger frame limit, the header limit still holds.)"""
    server = Daemon("--max-message-size", "128MiB")
    try:
        with RawClient(server.address) as raw:
            assert raw.hello()[0] == Msg.WELCOME
            header = codec.packb([Msg.BATCH, 1, [[Cmd.SYNC]], True])
            raw.send_raw(header + b"\x00" * (codec.MAX_HEADER_BYTES + 1 - len(header)))
            reply, _ = raw.receive()
            message = _assert_protocol_error(reply)
            assert "exceeds the limit" in message
            raw.put(1, torch.tensor([1.0]))
            assert raw.fetch(1).tolist() == [1.0]
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------------
# 6. The daemon dies while a client is connected
# ------------------------------------------------------------------------------------------------
def test_daemon_killed_mid_run_client_gets_connection_failed(own_daemon, tmp_path):
    ready, go = tmp_path / "ready", tmp_path / "go"
    client = spawn_client("compute_after_the_daemon_died.py", own_daemon.address, LIBREMOTE_HEARTBEAT="1",
                          READY=str(ready), GO=str(go))
    wait_for_file(ready, client)
    own_daemon.process.kill()
    own_daemon.process.wait(timeout=30)
    go.touch()
    out, err = finish(client, "the client hung after the daemon died")
    assert client.returncode == 0, err
    report = last_json(out)
    assert report.get("type") == "ConnectionFailed", report
    assert "lost the connection" in report["message"]
    assert own_daemon.address in report["message"]
    assert "lost the connection" in report.get("second", ""), report


def test_daemon_killed_while_client_waits_for_reply(tmp_path):
    """The daemon dies while the client is blocked in a sync point."""
    server = Daemon()
    ready = tmp_path / "ready"
    client = spawn_client("sync_until_the_daemon_dies.py", server.address, LIBREMOTE_HEARTBEAT="1", READY=str(ready))
    try:
        wait_for_file(ready, client)
        time.sleep(0.5)
        server.process.kill()
        server.process.wait(timeout=30)
        out, err = finish(client, "the client hung after the daemon died")
    finally:
        server.stop()
    assert client.returncode == 0, err
    report = last_json(out)
    assert report.get("type") == "ConnectionFailed", report
    assert "lost the connection" in report["message"]


def test_client_exits_after_its_daemon_died(own_daemon, tmp_path):
    """A program whose daemon died must still exit (the atexit disconnect must not hang)."""
    ready, go = tmp_path / "ready", tmp_path / "go"
    client = spawn_client("exit_after_the_daemon_died.py", own_daemon.address, LIBREMOTE_HEARTBEAT="1",
                          READY=str(ready), GO=str(go))
    wait_for_file(ready, client)
    own_daemon.process.kill()
    own_daemon.process.wait(timeout=30)
    go.touch()
    out, err = finish(client, "the client did not exit after its daemon died")
    assert "exiting" in out
    assert client.returncode == 0, err


# ------------------------------------------------------------------------------------------------
# 7. A client killed with -9 does not disturb others
# ------------------------------------------------------------------------------------------------
def test_killed_client_does_not_disturb_others(own_daemon, tmp_path):
    ready = tmp_path / "ready"
    victim = spawn_client("stream_ops_until_killed.py", own_daemon.address, READY=str(ready))
    with RawClient(own_daemon.address) as survivor:
        assert survivor.hello()[0] == Msg.WELCOME
        survivor.put(1, torch.tensor([1.0, 2.0, 3.0]))
        try:
            wait_for_file(ready, victim)
            time.sleep(0.5)
        finally:
            victim.kill()
            victim.wait(timeout=30)
        assert victim.returncode == -signal.SIGKILL

        # The survivor keeps working, its state intact.
        assert survivor.fetch(1).tolist() == [1.0, 2.0, 3.0]
        results, error, _ = survivor.call(
            [[Cmd.OP, [1, "aten::add.Tensor"], [codec.handle_ext(1), codec.handle_ext(1)], {}, [2]], [Cmd.SYNC]]
        )
        assert error is None, error
        assert survivor.fetch(2).tolist() == [2.0, 4.0, 6.0]

    # A new client after the kill works, and the daemon says it is serving it.
    code = """
        import torch, libremote
        print((torch.arange(4.0, device="cuda") + 1).sum().item())
    """
    result = run_python(code, timeout=60, LIBREMOTE_SERVER=own_daemon.address)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "10.0"
    assert own_daemon.process.poll() is None
    log = wait_for_log(own_daemon, "client said goodbye")
    assert log.count("opened") >= 3, log
    assert "Traceback" not in log, log
    assert "ERROR" not in log, log


def test_killed_client_session_and_memory_are_reclaimed(tmp_path):
    server = Daemon("--heartbeat", "0.5", "--heartbeat-timeout", "2")
    try:
        ready = tmp_path / "ready"
        victim = spawn_client("hold_4_mib_until_killed.py", server.address, READY=str(ready))
        try:
            wait_for_file(ready, victim)
            # Idle but alive: its heartbeats keep the session (well past the 2 s timeout).
            time.sleep(4)
            assert "silent" not in server.log(), server.log()
        finally:
            victim.kill()
            victim.wait(timeout=30)
        # Its connection closed with the process: reclaimed at once, not after the heartbeat
        # timeout (server/peers.py).
        log = wait_for_log(server, "its client disconnected", timeout=20)
        released = [line for line in log.splitlines() if "its client disconnected" in line and "released" in line]
        assert released and "released 4194304 bytes" in released[0], log
    finally:
        server.stop()


def test_frozen_client_is_reclaimed_after_the_heartbeat_timeout(tmp_path):
    """A client that stops answering without closing its connection (its host froze or vanished:
    here, SIGSTOP) is reclaimed once ZeroMQ's heartbeats or the daemon's PING timeout give up."""
    server = Daemon("--heartbeat", "0.5", "--heartbeat-timeout", "2")
    try:
        ready = tmp_path / "ready"
        victim = spawn_client("hold_4_mib_until_killed.py", server.address, READY=str(ready))
        try:
            wait_for_file(ready, victim)
            victim.send_signal(signal.SIGSTOP)
            log = wait_for_log(server, "released 4194304 bytes", timeout=30)
            assert "client silent" in log or "its client disconnected" in log, log
        finally:
            victim.kill()
            victim.wait(timeout=30)
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------------
# 8. Version skew: a client on another torch release
# ------------------------------------------------------------------------------------------------
def test_client_with_older_torch_is_accepted_and_ops_run_by_schema_name(daemon):
    with RawClient(daemon.address) as client:
        header = client.hello(torch="2.11.0", libremote="0.1.0")
        assert header[0] == Msg.WELCOME, header
        assert header[1]["protocol"] == messages.PROTOCOL_VERSION
        client.put(1, torch.tensor([1.0, 2.0, 3.0]))
        client.put(2, torch.tensor([10.0, 20.0, 30.0]))
        results, error, _ = client.call(
            [
                [Cmd.OP, [1, "aten::add.Tensor"], [codec.handle_ext(1), codec.handle_ext(2)], {}, [3]],
                # By id from now on; alpha is keyword-only in the schema.
                [Cmd.OP, 1, [codec.handle_ext(3), codec.handle_ext(1)], {"alpha": 2}, [4]],
                [Cmd.OP_SYNC, [2, "aten::sum"], [codec.handle_ext(4)], {}, [5]],
            ]
        )
        assert error is None, error
        values, metas = results[0]
        assert metas[0][1] == [] and metas[0][0] == torch.float32
        assert client.fetch(3).tolist() == [11.0, 22.0, 33.0]
        assert client.fetch(4).tolist() == [13.0, 26.0, 39.0]
        assert client.fetch(5).item() == 78.0
    assert "torch 2.11.0" in daemon.log()


# ------------------------------------------------------------------------------------------------
# 9. SIGTERM: a clean stop
# ------------------------------------------------------------------------------------------------
def test_sigterm_stops_the_daemon_cleanly(own_daemon):
    with RawClient(own_daemon.address) as client:
        assert client.hello()[0] == Msg.WELCOME
        client.put(1, torch.ones(1000))
        own_daemon.process.send_signal(signal.SIGTERM)
        try:
            code = own_daemon.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the daemon did not stop on SIGTERM:\n{own_daemon.log()}") from None
    assert code == 0, own_daemon.log()
    log = own_daemon.log()
    assert "received SIGTERM" in log
    assert "libremote-server stopped" in log
    assert "daemon stopping" in log  # the open session was closed on the way out
    assert "Traceback" not in log


def test_sigterm_with_a_library_client_connected(own_daemon, tmp_path):
    """A connected libremote client then sees a clear ConnectionFailed, not a hang."""
    ready, go = tmp_path / "ready", tmp_path / "go"
    client = spawn_client("compute_after_sigterm.py", own_daemon.address, LIBREMOTE_HEARTBEAT="1",
                          READY=str(ready), GO=str(go))
    wait_for_file(ready, client)
    own_daemon.process.send_signal(signal.SIGTERM)
    assert own_daemon.process.wait(timeout=30) == 0, own_daemon.log()
    go.touch()
    out, err = finish(client, "the client hung after the daemon stopped")
    assert "libremote-server stopped" in own_daemon.log()
    report = last_json(out)
    assert report.get("type") == "ConnectionFailed", report


def test_raw_undefined_optional_result_poisons_only_its_handle(raw):
    """A kernel may leave an optional result undefined (an attention backward asked for no bias
    gradient); the handle the client named for it says so, the others hold their tensors."""
    q = torch.randn(1, 2, 4, 8)
    for handle in (1, 2, 3):
        raw.put(handle, q)
    h = [codec.handle_ext(i) for i in (1, 2, 3)]
    results, error, _ = raw.call([
        [Cmd.OP, [1, "aten::_scaled_dot_product_fused_attention_overrideable"], h, {}, [4, 5, None, None, None, None, 6, 7, None]],
        [Cmd.OP, [2, "aten::ones_like"], [codec.handle_ext(4)], {}, [8]],
        [Cmd.OP, [3, "aten::_scaled_dot_product_fused_attention_overrideable_backward"],
         [codec.handle_ext(8), *h, None, [True, True, True, False], codec.handle_ext(4), codec.handle_ext(5),
          None, None, 4, 4, 0.0, False, codec.handle_ext(6), codec.handle_ext(7)], {}, [9, 10, 11, 12]],
        [Cmd.SYNC],
    ])
    assert error is None, error
    assert raw.fetch(9).shape == q.shape
    results, error, _ = raw.call([[Cmd.FETCH, 12]])
    assert error is not None and error[0] == "handle" and "returned no tensor" in error[2], error


def test_default_device_auto_serves_this_machines_device():
    """``libremote-server`` with no ``--device`` (auto) must pick a real device of this machine.

    Regression: ``torch.accelerator`` prefers a registered PrivateUse1 backend, and the daemon's
    process registers libremote's own client backend, so ``auto`` resolved to the client's
    remote device and the daemon served no device at all.
    """
    probe = run_python("import torch; print(torch.cuda.is_available())", timeout=120)  # without libremote
    expected = "cuda" if probe.stdout.strip() == "True" else "cpu"
    server = Daemon(device="auto")
    try:
        assert f"executing on {expected}" in server.log(), server.log()
        result = run_python("connect_and_compute.py", timeout=120, ADDRESS=server.address)
        assert result.returncode == 0, result.stderr
        assert last_json(result.stdout)["sum"] == 30.0
    finally:
        server.stop()


@pytest.mark.parametrize("spin", ["0", "5000"])
def test_waiting_for_answers_with_or_without_spinning_is_exact(daemon, spin):
    """LIBREMOTE_SPIN_US only changes how a thread waits for the daemon's answer (polling
    before it blocks), never what it gets: short and long waits both return the right values."""
    result = run_python("wait_for_short_and_long_answers.py", timeout=120, ADDRESS=daemon.address, LIBREMOTE_SPIN_US=spin)
    assert result.returncode == 0, result.stderr
    out = last_json(result.stdout)
    assert out["quick"] == [float(sum(range(1024)) + 1024 * i) for i in range(50)]
    assert out["slow"] is True and out["varied"] is True


def test_a_malformed_spin_setting_is_a_clear_error(daemon):
    result = run_python("import sys, torch, libremote; libremote.connect(sys.argv[1])", daemon.address,
                        timeout=120, LIBREMOTE_SPIN_US="fast")
    assert result.returncode != 0
    assert "LIBREMOTE_SPIN_US='fast' must be a whole number" in result.stderr, result.stderr


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS line")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the daemon's RSS from /proc")
def test_the_daemon_gives_host_memory_back_when_idle(own_daemon):
    """Freed host buffers are kept for reuse while clients work (server/host_memory.py), and
    returned to the operating system once no batch has arrived for a while."""
    baseline = _rss_bytes(own_daemon.process.pid)
    result = run_python("upload_and_free_256_mib.py", timeout=120, ADDRESS=own_daemon.address)
    assert result.returncode == 0, result.stderr
    assert last_json(result.stdout)["sum"] == 4.0
    deadline = time.monotonic() + 30
    while _rss_bytes(own_daemon.process.pid) > baseline + (96 << 20) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _rss_bytes(own_daemon.process.pid) <= baseline + (96 << 20), (baseline, _rss_bytes(own_daemon.process.pid))


@pytest.mark.parametrize("spin_us", ["0", "100000"])
def test_daemon_serves_syncs_whether_it_spins_or_sleeps_between_messages(spin_us):
    """--spin-us: the loop polls without sleeping for a while after each message. Messages that
    arrive inside that window and after it (the sleep below) are both served, in order."""
    server = Daemon("--spin-us", spin_us)
    try:
        with client_connected_to(server.address):
            host = torch.arange(12, dtype=torch.float32).reshape(3, 4)
            x = host.cuda()
            totals = []
            for step in range(6):
                x = x * 2 + 1
                host = host * 2 + 1
                totals.append(x.sum().item())
                if step % 2:
                    time.sleep(0.25)  # longer than the spin window: the daemon blocks in between
            assert totals[-1] == host.sum().item()
            assert torch.equal(x.cpu(), host)
    finally:
        assert server.stop() in (0, -15)


def test_negative_spin_is_refused_with_a_clear_error():
    result = subprocess.run(
        [sys.executable, "-m", "libremote_server", "--listen", f"tcp://127.0.0.1:{free_port()}", "--spin-us", "-5"],
        env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "--spin-us" in result.stderr and "microseconds >= 0" in result.stderr, result.stderr
