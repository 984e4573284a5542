"""Bounds on what one peer may make the daemon hold: every figure in one place.

The daemon is a trust boundary. Besides device memory (the quota) a client could make it hold host
memory and time: frames of any size, batches queued faster than they run, replies it never reads,
handles to empty tensors, op ids. Each has a bound here, chosen far above what the libremote client
ever needs, so that only a broken or hostile client meets one. The few an operator may want to
change are command-line options whose defaults are these figures (server/cli.py, README's table).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import zmq

from libremote_wire import codec, messages
from libremote_wire.codec import ProtocolError

# -- Before a session exists ------------------------------------------------------------------------
#: Default ``--max-message-size``: the largest frame ZeroMQ accepts (larger ones disconnect the
#: peer before the daemon sees a byte). The client sends tensor data in pieces of at most 8 MiB
#: (libremote/client/sync.py, UPLOAD_PIECE_BYTES; anything of 16 MiB or more is cut), and headers
#: stay far below codec.MAX_HEADER_BYTES, which this matches.
MAX_MESSAGE_BYTES = codec.MAX_HEADER_BYTES
#: Frames in one message (each one a Python object once received). A batch carries one frame per
#: upload; the client sends its batch at LIBREMOTE_BATCH commands (256) or 4 MiB of uploads.
MAX_FRAMES_PER_MESSAGE = 1 << 16
#: A peer that has not finished the ZeroMQ handshake (greeting, CURVE) within this long is
#: disconnected: a half-open connection holds a descriptor, and enough of them would take all.
HANDSHAKE_MS = 5000
#: Connections one address may hold open to a listening socket of the daemon (the front, each
#: worker); beyond it, new ones are shut down before their handshake (server/peers.py). A libremote
#: client holds two (its front and its worker); a host running many clients needs that many.
CONNECTIONS_PER_ADDRESS = 512
#: TCP keepalive on the daemon's sockets: a peer whose host vanished without closing its
#: connections is found out by the kernel within about IDLE + COUNT * INTERVAL seconds.
TCP_KEEPALIVE_IDLE_S = 30
TCP_KEEPALIVE_INTERVAL_S = 10
TCP_KEEPALIVE_COUNT = 3
#: Default ``--worker-memory-margin``: host memory a worker may take beyond what it held when
#: forked, besides (on the CPU backend) its tenant's quota: messages queued for it (up to
#: MAX_QUEUED_BYTES), replies, bookkeeping, torch's own host allocations.
WORKER_MEMORY_MARGIN = 1 << 30
#: Default ``--max-sessions-per-tenant``: sessions one (authenticated) tenant may hold at once;
#: its further clients wait in the admission queue, so no tenant can take every slot.
MAX_SESSIONS_PER_TENANT = 16
#: Default ``--max-sessions``: sessions per device; further clients wait in the admission queue.
#: Each session costs a CUDA stream, generators and bookkeeping even when idle.
MAX_SESSIONS_PER_DEVICE = 64
#: Clients waiting in the admission queue (each one a HELLO's info); more are refused.
MAX_WAITING = 1024
#: Messages waiting to go to one peer (ZeroMQ's SNDHWM on the daemon's socket). The daemon never
#: waits for a peer: one whose queue is full (it sends requests and reads no replies) loses its
#: session. The libremote client reads every reply (at most two acknowledgements are ever
#: unread), so only a peer that stopped reading meets this.
OUTBOX_MESSAGES = 1000

# -- Per session --------------------------------------------------------------------------------------
#: Batches / frame bytes a client may stream without asking for a reply: twice the window after
#: which the libremote client asks (messages.STREAM_WINDOW_*). Beyond it: a protocol violation,
#: and the session ends.
MAX_UNACKNOWLEDGED_BATCHES = 2 * messages.STREAM_WINDOW_BATCHES
MAX_UNACKNOWLEDGED_BYTES = 2 * messages.STREAM_WINDOW_BYTES
#: Batches / frame bytes queued and not yet run. The libremote client has at most two windows
#: queued (it waits for one acknowledgement before asking the next); a client that asks for
#: replies on every batch and floods them meets this bound instead.
MAX_QUEUED_BATCHES = 4 * messages.STREAM_WINDOW_BATCHES
MAX_QUEUED_BYTES = 4 * messages.STREAM_WINDOW_BYTES
#: Bytes of replies a session's client may leave unread (ZeroMQ holds them, and the tensors they
#: are copies of): beyond it the session's commands wait until the client reads. The libremote
#: client reads every reply it asks for at once.
MAX_UNSENT_REPLY_BYTES = 256 << 20
#: Default ``--max-handles``: live tensors one session may hold. Empty tensors cost no quota but
#: host memory each (a few hundred bytes); a large model with gradients and optimizer state holds
#: some hundreds of thousands.
MAX_HANDLES = 1 << 21
#: Op ids one session may define (the client gives each op name one id).
MAX_OP_IDS = 1 << 16
#: Explicit generators (``torch.Generator("cuda")``) one session may hold at once. Each is a few
#: kilobytes of host memory (a CPU generator's state is 5056 bytes); programs make a handful, and
#: the client drops each one the program lets go of. Making one more fails like out-of-memory.
MAX_GENERATORS = 1 << 12
#: Poisoned handles (outputs of failed ops) remembered to name the failure; beyond this the oldest
#: are forgotten (using one then says "does not belong to this session" instead).
MAX_POISONED_HANDLES = 1 << 16


def bound_connections(socket: zmq.Socket[Any]) -> None:
    """Options that keep connections from piling up on a listening socket (set before binding):
    a handshake deadline, and TCP keepalive for peers whose hosts vanished."""
    socket.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
    socket.setsockopt(zmq.TCP_KEEPALIVE, 1)
    socket.setsockopt(zmq.TCP_KEEPALIVE_IDLE, TCP_KEEPALIVE_IDLE_S)
    socket.setsockopt(zmq.TCP_KEEPALIVE_INTVL, TCP_KEEPALIVE_INTERVAL_S)
    socket.setsockopt(zmq.TCP_KEEPALIVE_CNT, TCP_KEEPALIVE_COUNT)


class LimitExceeded(ProtocolError):
    """A client went past a bound no libremote client reaches: its session ends."""


@dataclass
class Inflow:
    """What one session has streamed since it last asked for a reply, and what is queued."""

    unacknowledged_batches: int = 0
    unacknowledged_bytes: int = 0

    def admit(self, frame_bytes: int, want_reply: bool, queued_batches: int, queued_bytes: int) -> None:
        """Account for an arriving batch; :class:`LimitExceeded` when it breaks a bound."""
        if want_reply:
            self.unacknowledged_batches = self.unacknowledged_bytes = 0
        else:
            self.unacknowledged_batches += 1
            self.unacknowledged_bytes += frame_bytes
            if (self.unacknowledged_batches > MAX_UNACKNOWLEDGED_BATCHES
                    or self.unacknowledged_bytes > MAX_UNACKNOWLEDGED_BYTES):
                raise LimitExceeded(
                    f"the client streamed {self.unacknowledged_batches} batches ({self.unacknowledged_bytes} bytes) "
                    f"without asking for an acknowledgement (a reply); at most {MAX_UNACKNOWLEDGED_BATCHES} batches "
                    f"or {MAX_UNACKNOWLEDGED_BYTES} bytes may be, and libremote clients ask every "
                    f"{messages.STREAM_WINDOW_BATCHES} batches or {messages.STREAM_WINDOW_BYTES} bytes"
                )
        if queued_batches + 1 > MAX_QUEUED_BATCHES or queued_bytes + frame_bytes > MAX_QUEUED_BYTES:
            raise LimitExceeded(
                f"the client has {queued_batches} batches ({queued_bytes} bytes) queued and sent more; at most "
                f"{MAX_QUEUED_BATCHES} batches or {MAX_QUEUED_BYTES} bytes may wait (wait for acknowledgements)"
            )
