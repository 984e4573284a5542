"""Exports a tensor of cuda:0 (the first of two daemons) and PULLs it by hand from that daemon's
worker: with a wrong token, past its end, whole, and again; then asks the second daemon to PULL
from an ipc:// address and from a tcp:// port nobody listens on.

Prints {"wrong_token", "too_far", "again": the worker's answer, "first": [the answer, the values
pulled], "ipc": the error (null if none), "gone": [the error, seconds until it came] (null if
none)}.

Environment: LIBREMOTE_SERVER (two daemons: tcp://a,tcp://b).
"""

import json
import os
import socket
import time

import torch
import zmq

from libremote.client import runtime
from libremote_wire import codec, torch_codec
from libremote_wire.messages import Cmd, Msg

out = {}
source = runtime.session_for(0)
value = torch.arange(10, dtype=torch.int32, device="cuda:0")
(token, nbytes), _ = source.request([Cmd.EXPORT, value._ref.id])
peer = zmq.Context.instance().socket(zmq.DEALER)
peer.connect(source.connection.worker_address)


def pull(token, offset=0, length=nbytes):
    peer.send(codec.packb([Msg.PULL, token, offset, length]))
    assert peer.poll(10000)
    frames = peer.recv_multipart()
    return codec.unpackb(frames[0]), frames[1:]


out["wrong_token"] = pull(os.urandom(32))[0]
out["too_far"] = pull(token, 0, nbytes + 4)[0]
header, frames = pull(token)
out["first"] = [header, torch.frombuffer(bytearray(frames[0]), dtype=torch.int32).tolist()]
out["again"] = pull(token)[0]  # served once
# a PULL may name only tcp:// peers (never this daemon's ipc:// sockets)
target = runtime.session_for(1)
handle = target.new_handle()
target.submit([Cmd.PULL, handle, torch_codec.dtype_ext(torch.int32), [10], 0, "ipc:///tmp/anything", os.urandom(32), 40])
try:
    target.synchronize()
    out["ipc"] = None
except Exception as exc:
    out["ipc"] = str(exc)
# a peer that is not there fails the copy at once (not after the 30 s a piece may take)
with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    closed = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
started = time.monotonic()
target.submit([Cmd.PULL, target.new_handle(), torch_codec.dtype_ext(torch.int32), [10], 0, closed, os.urandom(32), 40])
try:
    target.synchronize()
    out["gone"] = None
except Exception as exc:
    out["gone"] = [str(exc), time.monotonic() - started]
print(json.dumps(out, default=str))
