"""The two halves of a cross-server copy in a session: EXPORT (snapshot bytes for a peer daemon's
worker) and PULL (fetch such bytes from one into a new tensor). The path and its security are in
:mod:`.exports`; the pulling socket is :mod:`.peer_pull`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from libremote_wire import codec, messages, torch_codec
from libremote_wire.messages import ErrorKind

from .errors import CommandError
from .exports import ExportRefused, Exports
from .peer_pull import PullFailed
from .residency import SpillExhausted

if TYPE_CHECKING:
    from .memory import MemoryAccount
    from .residency import DeviceMemory, StorageRecord


class TransfersMixin:
    """EXPORT and PULL for :class:`~.session.Session`; the worker sets :attr:`exports` and
    :attr:`peer_pull` when it opens the session."""

    exports: Exports | None = None
    #: ``(address, token, nbytes, into) -> received``: pulls from a peer worker (Worker._pull_from_peer).
    #: (source, token, nbytes, into, curve keys or None) -> bytes received
    peer_pull: Callable[[str, bytes, int, memoryview, tuple[bytes, ...] | None], int] | None = None
    bytes_exported = 0
    bytes_pulled = 0

    if TYPE_CHECKING:
        # What this mixin uses of the session (session.py) and its other mixins, declared for the
        # type checker only (see CommandsMixin): nothing here shadows them at run time.
        id: str
        device_memories: list[DeviceMemory | None]
        memory: MemoryAccount

        def tensor(self, handle: int) -> torch.Tensor: ...
        def _store(self, handle: Any, tensor: Any) -> None: ...
        def _device(self, index: Any) -> torch.device: ...
        def _index_of(self, device: torch.device | None) -> int: ...
        def _over_quota(self, extra: int = 0) -> bool: ...
        def _quota_message(self, in_use: int, needed: int) -> str: ...
        def _make_resident(self, what: str, tensors: list[torch.Tensor]) -> list[StorageRecord]: ...
        def _fit_on_device(self, what: str, inputs: list[StorageRecord], outs: Any) -> None: ...

    def _export(self, command: list[Any], frames: list[Any]) -> list[Any]:
        codec.check(len(command) == 2, "EXPORT takes [EXPORT, handle]")
        tensor = self.tensor(command[1])
        if tensor.layout is not torch.strided:
            raise CommandError(ErrorKind.OP, "EXPORT", "only strided tensors move between daemons")
        if self.exports is None:
            raise CommandError(ErrorKind.OP, "EXPORT", "this worker does not export tensors")
        if self.memory.managed:
            self._make_resident("EXPORT", [tensor])
        try:
            token, nbytes = self.exports.add(self.id, tensor)
        except ExportRefused as exc:
            raise CommandError(ErrorKind.OP, "EXPORT", str(exc)) from None
        self.bytes_exported += nbytes
        if self.exports.curve:  # (the key pair the pulling worker connects with; see exports.py)
            return [token, nbytes, self.exports.secret_of_last, self.exports.server_public]
        return [token, nbytes]

    def _pull(self, command: list[Any], frames: list[Any]) -> None:
        codec.check(len(command) in (8, 10), "PULL takes [PULL, new, dtype, shape, dev, source, token, nbytes] "
                    "and, from a CURVE daemon, [..., export secret key, its server key]")
        _, handle, dtype, shape, device_index, source, token, nbytes = command[:8]
        curve = tuple(command[8:]) or None
        codec.check(curve is None or all(type(key) is bytes and len(key) == 40 for key in curve),
                    "PULL's keys are z85 CURVE keys (40 bytes)")
        device = self._device(device_index)
        codec.check(isinstance(dtype, torch.dtype) and isinstance(shape, list)
                    and all(type(size) is int and size >= 0 for size in shape), "PULL needs a dtype and a shape")
        codec.check(type(source) is str and len(source) <= messages.MAX_PEER_ADDRESS, "PULL needs a source address")
        codec.check(type(token) is bytes and len(token) == messages.EXPORT_TOKEN_BYTES, "PULL needs an export token")
        numel = 1
        for size in shape:
            numel *= size
        codec.check(type(nbytes) is int and nbytes == numel * dtype.itemsize,
                    lambda: f"PULL of {nbytes} bytes cannot fill a {dtype} tensor of shape {shape}")
        if self._over_quota(nbytes):
            raise CommandError(ErrorKind.OOM, "cross-server copy",
                               self._quota_message(self.memory.allocated, nbytes))
        if self.peer_pull is None:
            raise CommandError(ErrorKind.OP, "PULL", "this worker does not pull from other daemons")
        stride = _contiguous(shape)
        device_memory = self.device_memories[self._index_of(device)] if self.memory.managed else None

        def make() -> torch.Tensor:
            return torch.empty_strided(shape, stride, dtype=dtype, device=device)

        if device_memory is None:
            tensor = make()
        else:
            try:
                tensor = device_memory.retrying_oom(make)
            except SpillExhausted as exc:
                raise CommandError(ErrorKind.OOM, "cross-server copy", str(exc)) from None
        # On the CPU backend the pieces land in the tensor itself; on a device, in host memory
        # first (then one copy to the device).
        staging = tensor if device.type == "cpu" else torch.empty(nbytes, dtype=torch.uint8)
        try:
            received = self.peer_pull(source, token, nbytes, torch_codec.tensor_bytes(staging), curve)
        except PullFailed as exc:
            raise CommandError(ErrorKind.OP, "cross-server copy", str(exc)) from None
        self.bytes_pulled += received
        if nbytes and staging is not tensor:
            tensor.view(-1).copy_(staging.view(dtype))
        self._store(handle, tensor)
        if self.memory.managed:
            self._fit_on_device("cross-server copy", [], [handle])


def _contiguous(shape: list[int]) -> list[int]:
    stride, step = [], 1
    for size in reversed(shape):
        stride.append(step)
        step *= max(size, 1)
    return list(reversed(stride))
