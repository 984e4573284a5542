"""Reference figures for the transport: plain pyzmq DEALER/ROUTER between two processes.

The echo peer runs in its own process (as the daemon does), so the figures include the same
process boundary and loopback TCP that libremote's messages cross. With ``curve`` keys both ends
speak CURVE (authenticated, encrypted), as a daemon started with ``--auth-keys`` does
(benchmarks/curve.py compares the two).
"""

from __future__ import annotations

import multiprocessing
import time

import zmq

from .timing import best_block_us


def _echo_peer(address: str, ready: multiprocessing.synchronize.Event,
               server_keys: tuple[bytes, bytes] | None = None) -> None:
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    if server_keys is not None:
        router.curve_server = True
        router.curve_publickey, router.curve_secretkey = server_keys
    router.bind(address)
    ready.set()
    while True:
        frames = router.recv_multipart(copy=False)
        command = frames[1].bytes
        if command == b"stop":
            router.send_multipart([frames[0], b"ok"])
            break
        if command == b"echo":
            router.send_multipart([frames[0], b"ok"])
        elif command == b"pull":  # reply with a payload of the requested size
            size = int(frames[2].bytes)
            router.send_multipart([frames[0], b"ok", _payload(size)], copy=False)
    router.close(0)
    context.term()


_payloads: dict[int, bytes] = {}


def _payload(size: int) -> bytes:
    if size not in _payloads:
        _payloads[size] = bytes(size)
    return _payloads[size]


class RawPeer:
    """A DEALER talking to an echo ROUTER in another process."""

    def __init__(self, address: str, *, curve: bool = False) -> None:
        server_public, server_secret = zmq.curve_keypair()
        ready = multiprocessing.get_context("spawn").Event()
        self.process = multiprocessing.get_context("spawn").Process(
            target=_echo_peer, args=(address, ready, (server_public, server_secret) if curve else None), daemon=True)
        self.process.start()
        ready.wait(30)
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        if curve:
            self.socket.curve_publickey, self.socket.curve_secretkey = zmq.curve_keypair()
            self.socket.curve_serverkey = server_public
        self.socket.connect(address)

    def round_trip_us(self) -> float:
        """A 64-byte message there and back (see benchmarks/timing.py for how it is timed)."""
        payload = b"x" * 64

        def exchange() -> None:
            self.socket.send_multipart([b"echo", payload])
            self.socket.recv_multipart()

        return best_block_us(exchange)

    def upload_gbps(self, nbytes: int, repeats: int = 5) -> float:
        payload = bytearray(nbytes)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            self.socket.send_multipart([b"echo", payload], copy=False)
            self.socket.recv_multipart()
            best = min(best, time.perf_counter() - start)
        return nbytes / best / 1e9

    def download_gbps(self, nbytes: int, repeats: int = 5) -> float:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            self.socket.send_multipart([b"pull", str(nbytes).encode()])
            self.socket.recv_multipart(copy=False)
            best = min(best, time.perf_counter() - start)
        return nbytes / best / 1e9

    def close(self) -> None:
        self.socket.send_multipart([b"stop"])
        self.socket.recv_multipart()
        self.process.join(10)
        self.socket.close(0)
        self.context.term()
