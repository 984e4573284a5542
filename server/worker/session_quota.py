"""A session's memory quota, and its tenant's: checked before an op allocates and after it ran.

A session holds at most its own quota (``libremote admin`` may change it; the client may cap
itself lower, ``set_per_process_memory_fraction``), and a tenant's sessions in its worker hold
together at most the tenant's (:class:`TenantAccount`). Before an op runs, what it would
allocate is bounded (preflight.py); after it ran, what it did allocate is counted: the only
check for ops whose output size depends on their data.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

import torch

from libremote_wire.codec import HandleRef
from libremote_wire.messages import ErrorKind

from . import op_policy, preflight, values
from .errors import CommandError, QuotaRefusal
from .memory import MemoryAccount

if TYPE_CHECKING:
    from ..policy import Tenant

log = logging.getLogger("libremote.server")


class HoldsMemory(Protocol):
    """A session, as its tenant's account sees it."""

    memory: MemoryAccount


class TenantAccount:
    """A tenant's memory quota, shared by its sessions in its worker: what they hold together
    stays within it (each session also within its own quota, by default the same figure)."""

    def __init__(self, quota: int) -> None:
        self.quota = quota
        self.sessions: list[HoldsMemory] = []

    def allocated(self) -> int:
        return sum(session.memory.allocated for session in self.sessions)


class QuotaMixin:
    """The quota checks of :class:`~.session.Session` (a mixin: state lives on the session).

    The session's state and methods these checks use are declared below for the type checker
    only (``if TYPE_CHECKING``): they name what this mixin relies on, and mypy checks that
    Session defines each with the same type, while at run time the class body holds none of
    them, so nothing here shadows the session's own through the MRO.
    """

    if TYPE_CHECKING:
        # Session state (session.py).
        tenant: Tenant
        account: TenantAccount | None
        memory: MemoryAccount
        memory_limit: int
        _memory_quota: int
        _storage_keys: dict[int, Any]
        _failed: dict[int, str]

        @property
        def memory_quota(self) -> int: ...

        # Session's methods (session.py).
        def _drop(self, handle: int) -> None: ...

    # ------------------------------------------------------------------------------------------
    # Quota: a session never holds more than its tenant's memory quota
    # ------------------------------------------------------------------------------------------
    def _check_quota_before(self, entry: op_policy.OpEntry, args: list[Any], kwargs: dict[str, Any]) -> None:
        """Refuse an op before it runs when what it would allocate is known not to fit in the
        session's quota (server/preflight.py; cheap for ops that surely fit)."""
        headroom = self._headroom()
        needed = preflight.needed_bytes(entry, args, kwargs, headroom)
        if needed is not None and needed > headroom:
            raise QuotaRefusal(ErrorKind.OOM, entry.name, self._quota_message(self.memory.allocated, needed))

    @staticmethod
    def _resized_handles(entry: op_policy.OpEntry, wire_args: list[Any], wire_kwargs: dict[str, Any]) -> list[int]:
        """Handles of the arguments the op may resize (``OpEntry.resized_arguments``)."""
        handles = []
        for where, key in entry.resized_arguments:
            wire = (wire_args[key] if key < len(wire_args) else None) if where == "arg" else wire_kwargs.get(key)
            if isinstance(wire, HandleRef):
                handles.append(wire.handle)
        return handles

    def _remeasure(self, entry: op_policy.OpEntry, args: list[Any], kwargs: dict[str, Any],
                   wire_args: list[Any], wire_kwargs: dict[str, Any]) -> list[int]:
        """Re-read storage sizes of arguments the op may have resized; the handles that grew."""
        grown = []
        for where, key in entry.resized_arguments:
            value = (args[key] if key < len(args) else None) if where == "arg" else kwargs.get(key)
            wire = (wire_args[key] if key < len(wire_args) else None) if where == "arg" else wire_kwargs.get(key)
            if isinstance(value, torch.Tensor) and isinstance(wire, HandleRef) and value.layout is torch.strided and (
                    self._charge_new_storage(wire.handle, value) or self.memory.refresh(value)):
                grown.append(wire.handle)
        return grown

    def _charge_new_storage(self, handle: int, tensor: torch.Tensor) -> bool:
        """After ``set_``, the handle's tensor may use another storage than before: charge (and,
        under oversubscription, track) that one for it instead, so that every storage's handle
        count stays exact (Lookahead.dead relies on it). Returns whether the session grew."""
        key = self._storage_keys.get(handle)
        if key is None or key == tensor.untyped_storage()._cdata:
            return False
        before = self.memory.allocated
        self._storage_keys[handle] = self.memory.add(tensor)
        self.memory.release(key)
        return self.memory.allocated > before

    def _refuse_over_quota(self, what: str, allocated_before: int, outs: Any, grown: Any = ()) -> None:
        """The op left the session over its quota: undo its outputs and raise the OOM error.
        Tensors it grew in place (resize_, out=) cannot be shrunk back consistently with the
        client's view of them, so they are dropped and poisoned: using them raises this error."""
        needed = self.memory.allocated - allocated_before
        message = self._quota_message(allocated_before, needed)
        for handle in [*values.flatten_handles(outs), *grown]:
            if isinstance(handle, int):
                self._drop(handle)
                self._failed[handle] = f"{what} failed: {message}"
        raise CommandError(ErrorKind.OOM, what, message)

    def _headroom(self) -> int:
        """Bytes this session may still allocate: within its own quota (or cap), and within its
        tenant's, which all the tenant's sessions in this worker share."""
        room = self.memory_limit - self.memory.allocated
        account = self.account
        if account is not None and (len(account.sessions) > 1 or account.quota < self.memory_limit):
            room = min(room, account.quota - account.allocated())
        return room

    def _over_quota(self, extra: int = 0) -> bool:
        return self._headroom() < extra

    def _tenant_binds(self) -> bool:
        """Whether the tenant's shared quota, not this session's own, is what is short."""
        account = self.account
        return account is not None and account.quota - account.allocated() < self.memory_limit - self.memory.allocated

    def _quota_message(self, in_use: int, needed: int) -> str:
        if self._tenant_binds():
            account = self.account
            assert account is not None
            return (
                f"CUDA out of memory: tenant {self.tenant.name!r} may hold {values.size_text(account.quota)} across its "
                f"{len(account.sessions)} sessions, {values.size_text(account.allocated())} are in use and the request "
                f"needs {values.size_text(needed)} more. Free tensors you no longer need (del them), close other "
                "sessions of the tenant, or ask the operator for a larger quota."
            )
        if self.memory_limit < self._memory_quota:
            return (
                f"CUDA out of memory: this process limited itself to {values.size_text(self.memory_limit)} "
                f"(torch.cuda.set_per_process_memory_fraction), {values.size_text(in_use)} are in use and the "
                f"request needs {values.size_text(needed)} more. Free tensors you no longer need (del them), or "
                "raise the fraction."
            )
        return (
            f"CUDA out of memory: this session's quota is {values.size_text(self.memory_quota)}, {values.size_text(in_use)} "
            f"are in use and the request needs {values.size_text(needed)} more (tenant {self.tenant.name!r}). "
            "Free tensors you no longer need (del them), or ask the operator for a larger quota."
        )
