"""The client's side of a daemon session: handles, the command stream, and sync points.

Layer 1, the session: over :mod:`.connection`; every layer above sends through it.

Ops stream: each becomes a command appended to the pending batch, and the batch goes out when it
fills or when the program needs something back (a *sync point*: ``.item()``, ``.cpu()``,
``print``, ``torch.cuda.synchronize()``, a dynamic-shape op). Only sync points wait. Handles are
integers this side allocates, so an op never waits to learn the name of its result.

Backpressure: a program that never syncs streams for ever, and the daemon holds a client to a
bounded stream (server/limits.py). So every ``messages.STREAM_WINDOW_BATCHES`` batches or
``STREAM_WINDOW_BYTES`` bytes, a streamed batch asks for a reply (an acknowledgement), and before
asking for the next one the client waits for the previous: at most two windows are in flight, and
the wire stays busy meanwhile. An error an acknowledgement carries is raised at the next sync point,
where it would have surfaced without it.

Thread safety: autograd runs backward on a device thread and handles are released from whatever
thread drops the last reference, so every method that touches the batch or the socket takes
``self._lock``. Releases only append to a deque (no lock), which makes them safe to run from a
garbage-collector pass that interrupts a locked section.
"""

from __future__ import annotations

import collections
import itertools
import os
import threading
import time
from typing import Any

import torch

from libremote_wire import messages, numerics, torch_codec
from libremote_wire.curve_keys import ClientKeys, KeyFileError
from libremote_wire.messages import Cmd, ErrorKind, Msg

from .. import errors
from ..config import Settings
from .auto_replay import StepTracker
from .connection import Connection

#: Pending upload bytes above which the batch is sent at once.
_MAX_PENDING_BYTES = 4 << 20
#: Commands sent while recording a step that are not part of it: graph definitions, settings,
#: explicit generators made or dropped meanwhile.
_NOT_RECORDED = frozenset({Cmd.GRAPH, Cmd.SETTINGS, Cmd.GENERATOR})


def _client_keys(settings: Settings) -> ClientKeys | None:
    """The CURVE keys named by LIBREMOTE_CLIENT_KEY / LIBREMOTE_SERVER_KEY, or None (plain TCP)."""
    try:
        return ClientKeys.from_files(settings.client_key, settings.server_key)
    except KeyFileError as exc:
        raise errors.ConnectionFailed(f"libremote: {exc}") from None


class ClientSession:
    """One daemon's session. A program with devices on several daemons holds one per daemon
    (:mod:`.servers`); ``global_devices`` says which of the program's ``cuda:N`` are this
    session's devices, in the daemon's order (the daemon numbers them 0, 1, ... within the
    session: :meth:`local_device` translates)."""

    def __init__(self, settings: Settings, address: str, libremote_version: str, *,
                 devices: int | None = None, global_devices: list[int] | None = None,
                 device_indices: list[int] | None = None, reservation: str | None = None) -> None:
        self.settings = settings
        self.address = address
        self.connection = Connection(address, timeout_s=settings.timeout_s, heartbeat_s=settings.heartbeat_s,
                                     spin_s=settings.spin_us * 1e-6, curve=_client_keys(settings),
                                     stripes=settings.stripes)
        welcome = self.connection.handshake(
            libremote_version, tenant=settings.tenant, token=settings.token, priority=settings.priority,
            queue_timeout_s=settings.queue_timeout_s, devices=settings.devices if devices is None else devices,
            device_indices=device_indices, reservation=reservation,
        )
        if device_indices is not None and "device_pins" not in welcome.get("features", ()):
            self.connection.close()
            raise errors.ConnectionFailed(
                f"libremote: the daemon at {address} is too old to pin devices (#N in LIBREMOTE_SERVER): it would "
                "place the session by its own policy; upgrade it, or name the address without #N")
        self.session_id: str = welcome["session"]
        self.devices: list[dict[str, Any]] = welcome["devices"]
        self.daemon_info = welcome
        self.global_devices = list(range(len(self.devices))) if global_devices is None else list(global_devices)
        #: cuda:N -> this daemon's index, where they differ (empty with one daemon: the identity).
        self._local = {glob: loc for loc, glob in enumerate(self.global_devices) if glob != loc}
        self.pid = os.getpid()
        self._lock = threading.RLock()
        self._next_handle = itertools.count(1).__next__
        self._next_seq = itertools.count(1).__next__
        self._op_ids: dict[str, int] = {}
        self._commands: list[list[Any]] = []
        self._frames: list[Any] = []
        self._pending_bytes = 0
        self._released: collections.deque[int] = collections.deque()
        self._released_programs: collections.deque[int] = collections.deque()
        self._released_generators: collections.deque[int] = collections.deque()
        self._deferred_error: Exception | None = None
        #: Streamed since the last batch that asked for a reply (see Backpressure above), and the
        #: seq of the acknowledgement asked for and not yet received.
        self._streamed_batches = 0
        self._streamed_bytes = 0
        self._acknowledgement: int | None = None
        #: When a list, the name of every op sent is appended (``libremote.op_trace()``).
        self.op_log: list[str] | None = None
        #: When a list, every command sent is also appended to it (``libremote.capture_step``).
        self._recording: list[Any] | None = None
        self._recording_runs = True  # False while torch.cuda.graph records: commands are not sent
        self._recording_first_handle = 0
        self._recording_new_ops: list[str] = []  # ops first named while recording without running
        #: While recording without running: weak references to the tensors made (their layouts
        #: go to the daemon with the recording, see capture.CUDAGraph).
        self.made_while_recording: list[Any] | None = None
        self.closed = False
        #: The numerics switches the daemon has for this session (libremote/numerics.py); None
        #: until the first batch, which always carries them. A daemon without the feature gets none.
        self._sent_numerics: tuple[Any, ...] | None = None
        self._daemon_takes_settings = "settings" in welcome.get("features", ())
        self.ping_interval_s = float(welcome.get("heartbeat_s", 2.0))
        #: Repeated steps sent as one command (LIBREMOTE_AUTO_REPLAY; auto_replay.py), and how
        #: many of the pending commands it has seen.
        self.steps: StepTracker | None = None
        if settings.auto_replay and not settings.sync and "steps" in welcome.get("features", ()):
            self.steps = StepTracker(settings.auto_replay, self._op_name)
            self.steps.begin()
        self._observed = 0
        threading.Thread(target=self._heartbeat, name="libremote-heartbeat", daemon=True).start()

    @property
    def recording(self) -> bool:
        """Whether commands are being recorded (``capture_step``, ``torch.cuda.graph``)."""
        return self._recording is not None

    def local_device(self, index: int) -> int:
        """The daemon's number for the program's ``cuda:index`` (an index of another daemon's
        device passes through unchanged, and the daemon refuses it)."""
        return self._local.get(index, index) if self._local else index

    # ------------------------------------------------------------------------------------------
    # Handles
    # ------------------------------------------------------------------------------------------
    def new_handle(self) -> int:
        return self._next_handle()

    def release(self, handle: int) -> None:
        """Called when a tensor's last reference goes; the FREE travels with the next batch."""
        if not self.closed:
            self._released.append(handle)

    def release_program(self, program_id: int) -> None:
        """Called when a ``torch.cuda.CUDAGraph`` is reset or collected: the daemon forgets the
        step (and the memory its results held) with the next batch. Like :meth:`release`, only
        appends to a deque: safe from a garbage-collector pass."""
        if not self.closed:
            self._released_programs.append(program_id)

    def release_generator(self, generator_id: int) -> None:
        """Called when a ``torch.Generator("cuda")`` is collected: the daemon drops its generator
        with the next batch. Like :meth:`release`, only appends to a deque."""
        if not self.closed:
            self._released_generators.append(generator_id)

    def op_ref(self, name: str) -> Any:
        """The wire reference for op ``name``: its id, defined by name on first use."""
        if self.op_log is not None:
            self.op_log.append(name)
        op_id = self._op_ids.get(name)
        if op_id is not None:
            return op_id
        with self._lock:
            op_id = self._op_ids.get(name)
            if op_id is None:
                op_id = self._op_ids[name] = len(self._op_ids) + 1
                if not self._recording_runs:
                    self._recording_new_ops.append(name)
                return [op_id, name]
            return op_id

    # ------------------------------------------------------------------------------------------
    # Streaming
    # ------------------------------------------------------------------------------------------
    def submit(self, command: list[Any]) -> None:
        """Queue a command that needs no answer."""
        with self._lock:
            if self._released:
                self._queue_frees()
            self._commands.append(command)
            if self.steps is not None and self._holding_back():
                return
            if self.settings.sync:
                self._roundtrip()
            elif len(self._commands) >= self.settings.batch:
                self._flush(want_reply=False)

    def submit_data(self, fields: list[Any], tensor: torch.Tensor) -> None:
        """Queue a command that carries ``tensor``'s bytes (UPLOAD, PUT) as its last field.

        The bytes are taken now: the program may overwrite its tensor as soon as this returns.
        Small tensors are copied into the batch; large ones go out at once, zero-copy, and this
        returns when ZeroMQ is done reading them.
        """
        if self._recording is not None:
            raise errors.CaptureError(
                "libremote: a captured step cannot send new host data (a CPU tensor moved to the device, "
                "torch.tensor(..., device='cuda')): a replay would reuse the old bytes. Pass the data as "
                "an input of the step instead."
            )
        source = tensor.detach()
        if source.is_conj() or source.is_neg():
            source = source.resolve_conj().resolve_neg()
        contiguous = source.contiguous()
        large = contiguous.nbytes > messages.INLINE_TENSOR_BYTES
        data = torch_codec.tensor_bytes(contiguous) if large else bytes(torch_codec.tensor_bytes(contiguous))
        with self._lock:
            if self._released:
                self._queue_frees()
            self._frames.append(data)
            self._commands.append([*fields, len(self._frames)])
            self._pending_bytes += contiguous.nbytes
            if self.steps is not None:
                if large or self._pending_bytes > _MAX_PENDING_BYTES:
                    self.steps.stop_matching("a large upload")
                if self._holding_back():
                    return
            if self.settings.sync:
                self._roundtrip()
            elif large:
                tracker = self._flush(want_reply=False, track=True)
                tracker.wait()
            elif self._pending_bytes > _MAX_PENDING_BYTES or len(self._commands) >= self.settings.batch:
                self._flush(want_reply=False)

    def request(self, command: list[Any]) -> tuple[Any, list[Any]]:
        """Send ``command`` with everything pending, wait, and return (its result, reply frames)."""
        if self._recording is not None:
            raise errors.CaptureError(
                "libremote: a captured step cannot wait for the device (.item(), .cpu(), print, "
                f"synchronize, ops whose result shape depends on data; here: {_command_name(command)}): a "
                "replay sends one command and reads nothing back. Move it out of the step, after the call."
            )
        with self._lock:
            if self._released or self._released_programs or self._released_generators:  # (before the request: memory figures see them)
                self._queue_frees()
            if self.steps is not None:
                self._end_step()
            self._commands.append(command)
            try:
                results, frames = self._roundtrip()
            finally:
                if self.steps is not None:
                    self.steps.begin()
        return results[-1], frames

    def flush(self) -> None:
        with self._lock:
            if self.steps is not None:
                self.steps.stop_matching("an explicit flush")
            if self._commands or self._released:
                self._flush(want_reply=False)

    def synchronize(self) -> None:
        self.request([Cmd.SYNC])

    # ------------------------------------------------------------------------------------------
    # Repeated steps (LIBREMOTE_AUTO_REPLAY; auto_replay.py)
    # ------------------------------------------------------------------------------------------
    def _holding_back(self) -> bool:
        """Show the step tracker the commands queued since it last looked; whether they are
        held back (they match a repeated step so far) rather than sent as usual."""
        assert self.steps is not None
        commands, observe = self._commands, self.steps.observe
        for position in range(self._observed, len(commands)):
            observe(commands[position])
        self._observed = len(commands)
        return self.steps.matching

    def _end_step(self) -> None:
        """A sync point: the step's held-back commands become one RUN_STEP if they were a
        repeated step to its end; a step seen often enough is sent as a template."""
        assert self.steps is not None
        self._holding_back()
        run, template = self.steps.finish()
        if run is not None:
            self._commands = [run]  # (the frames stay: the inline commands name them)
            self._observed = 1  # (op_trace() lists the step's ops as usual: the daemon runs them all)
        if template is not None:
            self._commands.insert(0, template)  # (taken when the batch is queued, before it runs)
            self._observed += 1

    def _op_name(self, op_id: int) -> str:
        return next((name for name, known in self._op_ids.items() if known == op_id), f"op #{op_id}")

    def _queue_frees(self) -> None:
        """Queue a FREE for the handles released so far, in order with the other commands: the
        daemon frees a dropped tensor before the next op runs (quotas see it gone at once)."""
        released = []
        while self._released:
            released.append(self._released.popleft())
        if released:
            self._commands.append([Cmd.FREE, released])
        while self._released_programs:
            self._commands.append([Cmd.PROGRAM, self._released_programs.popleft(), [], {"drop": True}])
        while self._released_generators:
            self._commands.append([Cmd.GENERATOR, self._released_generators.popleft()])

    def start_recording(self, recording: list[Any], *, run: bool = True) -> None:
        """From now on, also append every command sent to ``recording`` (pending ones go first).
        With ``run=False`` (``torch.cuda.graph``) the recorded commands are not sent, only
        recorded; graph definitions, and frees of tensors made before the recording, still go."""
        if self.steps is not None:
            self.steps.stop_matching("a capture")
            self.steps.valid = False
        self.flush()
        self._recording = recording
        self._recording_runs = run
        self.made_while_recording = None if run else []
        # Handles are only names: taking one here marks where the recording's own handles start.
        self._recording_first_handle = self._next_handle()

    def stop_recording(self, *, discard: bool = False) -> list[Any]:
        """Stop recording; return the tensors made meanwhile that are still alive (``run=False``
        only). ``discard``: the recording is thrown away, so the ops it named first are named
        again next time (the daemon never saw them)."""
        with self._lock:
            made = [tensor for tensor in (ref() for ref in self.made_while_recording or ()) if tensor is not None]
            self.made_while_recording = None
            if self._recording is not None and not self._recording_runs:
                self._flush(want_reply=False)  # the last recorded commands, before recording stops
                if discard:
                    for name in self._recording_new_ops:  # the newest ids: the table shrinks back
                        del self._op_ids[name]
            self._recording = None
            self._recording_runs = True
            self._recording_new_ops = []
        return made

    def _flush(self, *, want_reply: bool, track: bool = False) -> Any:
        commands = self._commands
        if self.steps is not None:
            self._queue_frees()
            self._holding_back()  # (what goes out is part of the step: seen before it goes)
            self.steps.stop_matching("a batch had to go out mid-step")  # (what is sent is never replayed)
        if self._daemon_takes_settings:
            seen = numerics.fingerprint()
            if seen != self._sent_numerics:
                commands.insert(0, [Cmd.SETTINGS, numerics.as_wire(numerics.current())])
                self._sent_numerics = seen
        self._queue_frees()
        if self._recording is not None:  # graph definitions and settings stay: not part of the program
            self._recording.extend(command for command in commands if command[0] not in _NOT_RECORDED)
            if not self._recording_runs:
                commands = self._outside_recording(commands)
                if not commands and not want_reply:
                    self._commands = []
                    self._observed = 0
                    return None
        frames, nbytes = self._frames, self._pending_bytes
        self._commands, self._frames, self._pending_bytes = [], [], 0
        self._observed = 0
        acknowledged = want_reply or self._window_full(nbytes)
        seq = self._next_seq()
        tracker = self.connection.send([Msg.BATCH, seq, commands, acknowledged], frames, track=track)
        if acknowledged and not want_reply:
            self._acknowledgement = seq
        return tracker if track else seq

    def _window_full(self, nbytes: int) -> bool:
        """Count a streamed batch of ``nbytes``; when the window is full, wait for the previous
        acknowledgement and return True: this batch asks for the next one."""
        self._streamed_batches += 1
        self._streamed_bytes += nbytes
        if (self._streamed_batches < messages.STREAM_WINDOW_BATCHES
                and self._streamed_bytes < messages.STREAM_WINDOW_BYTES):
            return False
        self._streamed_batches = self._streamed_bytes = 0
        while self._acknowledgement is not None:
            header, _ = self.connection.receive(while_waiting=self._ping_if_due)
            self._take_unawaited(header)
        return True

    def _take_unawaited(self, header: list[Any]) -> None:
        """A message that is not the reply being waited for: an acknowledgement, or the daemon's
        answer to a malformed streamed batch. An error it carries is raised at the next sync."""
        if header[0] != Msg.REPLY:
            return
        _, reply_seq, _, error = header
        if reply_seq is None and error and error[0] == ErrorKind.SESSION.value:
            # The session is over (its worker died, the daemon reclaimed it): nothing will answer.
            failure = errors.from_wire(error)
            self.connection.broken = str(failure)
            raise failure
        if self._acknowledgement is not None and (reply_seq is None or reply_seq >= self._acknowledgement):
            self._acknowledgement = None  # (replies come in order: a later one means it came)
        if error and self._deferred_error is None:
            self._deferred_error = errors.from_wire(error)

    def _outside_recording(self, commands: list[list[Any]]) -> list[list[Any]]:
        """Of commands recorded without running, what must still reach the daemon now: graph
        definitions, settings, and frees of tensors made before the recording began (the
        recording keeps only the frees of what it makes itself; see server/programs.py)."""
        first = self._recording_first_handle
        sent: list[list[Any]] = []
        for command in commands:
            if command[0] in _NOT_RECORDED:
                sent.append(command)
            elif command[0] == Cmd.FREE:
                older = [handle for handle in command[1] if handle < first]
                if older:
                    sent.append([Cmd.FREE, older])
        return sent

    def _ping_if_due(self) -> None:
        """Tell the daemon we are alive if nothing else went out lately (caller holds the lock)."""
        if time.monotonic() - self.connection.last_send >= self.ping_interval_s:
            try:
                self.connection.send([Msg.PING], timeout_s=0)
            except (TimeoutError, errors.ConnectionFailed):
                pass

    def _heartbeat(self) -> None:
        """Background PINGs while the program is busy elsewhere (a thread that holds the lock
        while waiting for a reply pings from its wait loop instead)."""
        while not self.closed and os.getpid() == self.pid:
            time.sleep(self.ping_interval_s / 2)
            if self.closed or self.connection.broken:
                return
            if self._lock.acquire(blocking=False):
                try:
                    if not self.closed:
                        self._ping_if_due()
                finally:
                    self._lock.release()

    def _roundtrip(self) -> tuple[list[Any], list[Any]]:
        seq = self._flush(want_reply=True)
        self._streamed_batches = self._streamed_bytes = 0
        while True:
            header, frames = self.connection.receive(while_waiting=self._ping_if_due)
            if header[0] != Msg.REPLY or header[1] != seq:
                self._take_unawaited(header)
                continue
            _, reply_seq, results, error = header
            self._acknowledgement = None
            if self._deferred_error is not None:
                error_to_raise, self._deferred_error = self._deferred_error, None
                raise error_to_raise
            if error:
                raise errors.from_wire(error)
            return results, frames

    # ------------------------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if os.getpid() == self.pid and not self.connection.broken:
                try:
                    self.connection.send([Msg.BYE], timeout_s=1.0)
                except Exception:  # the daemon is gone: nothing to say goodbye to
                    pass
            self.connection.close()


def _command_name(command: list[Any]) -> str:
    if command and command[0] in (Cmd.OP, Cmd.OP_SYNC) and len(command) > 1:
        ref = command[1]
        return str(ref[1]) if isinstance(ref, list) else "an op that needs its result"
    try:
        return Cmd(command[0]).name
    except (ValueError, IndexError):
        return "a command"
