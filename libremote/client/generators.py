"""``torch.Generator("cuda")``: explicit random generators that live on the daemon.

Layer 2, remote tensors and what else lives on the daemon: :mod:`.ops` sends a generator argument
through :func:`wire`, and :mod:`.patches` makes :class:`Generator` ``torch.Generator``.

On a CPU build of torch, ``torch.Generator(device="cuda")`` raises ("Cannot get CUDA generator
without ATen_cuda library"), and torch's Python device backends cannot supply a generator of their
own (a PrivateUse1 generator needs ``PrivateUse1HooksInterface::getNewGenerator``, C++ only). Yet
programs build them: diffusers pipelines are called with
``generator=torch.Generator("cuda").manual_seed(0)``, timm's ``ModelEmaV3`` makes one even when
unused.

So while libremote is active ``torch.Generator`` is :class:`Generator`, a subclass of torch's own
class whose metaclass hands out a :class:`RemoteGenerator` for ``cuda`` (and the remote device) and
a plain ``torch._C.Generator`` for anything else; ``isinstance(g, torch.Generator)`` holds for both
kinds, as before. A RemoteGenerator is a real ``torch._C.Generator`` (torch's argument parser
accepts it for ``generator=``, and the dispatcher hands the very object to
``__torch_dispatch__``), backed by a CPU generator that nothing draws from: its numbers come from a
generator object in the session on the daemon, named by an id this side allocates (the protocol's
GENERATOR command and EXT_GENERATOR values), so making and seeding one never waits. The backing CPU
generator only mirrors the seed, so that ``manual_seed``'s argument handling and ``initial_seed()``
are torch's own.

Where the numbers come from: a random op on remote tensors with ``generator=g`` sends ``g``'s id
and the daemon draws from that generator (on a CPU daemon: exactly what a CPU ``torch.Generator``
seeded the same way gives locally). An op that runs on the host with a remote generator raises
CUDA's error (``Expected a 'cpu' device type for generator but found 'cuda'``), and a remote op
with a host generator the reverse, as on CUDA; a ``DataLoader`` given a device generator therefore
fails at ``iter()`` exactly as it does on CUDA (it draws its base seed with
``torch.empty((), dtype=torch.int64).random_(generator=...)`` on the host).

The daemon's generator is dropped when the program's object is collected (the drop travels with
the next batch, like a tensor's FREE).
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

import torch

from libremote_wire import codec
from libremote_wire.messages import Cmd

from . import backend, runtime
from .tensor import RemoteTensor

_TorchGenerator = torch._C.Generator
_original = torch._C.Generator  # what torch.Generator is without libremote

#: Generator ids, unique in this process (the daemon keeps them apart from tensor handles).
_ids = itertools.count(1)
#: Each live RemoteGenerator by the address of its C++ generator (``_cdata``). The dispatcher
#: passes generators to ``__torch_dispatch__`` as IValues, and torch wraps one in a *new*
#: ``torch._C.Generator`` object on the way back to Python (``THPGenerator_Wrap``: a generator made
#: by ``torch.Generator(...)`` has no Python object attached, torch/csrc/Generator.cpp), so the
#: op path finds the program's object again by its C++ generator.
_by_impl: weakref.WeakValueDictionary[int, RemoteGenerator] = weakref.WeakValueDictionary()

#: CUDA's own messages (``check_generator``, aten/src/ATen/core/DistributionsHelper.h and
#: ATen/Utils.h): a kernel was given a generator of another device type.
HOST_OP_MESSAGE = "Expected a 'cpu' device type for generator but found 'cuda'"
DEVICE_OP_MESSAGE = "Expected a 'cuda' device type for generator but found 'cpu'"


class RemoteGenerator(_TorchGenerator):
    """A generator on the daemon's device, as ``torch.Generator("cuda")`` is on CUDA."""

    _id: int
    _index: int | None
    _session: Any
    _wire: Any

    def __new__(cls, index: int | None = None) -> RemoteGenerator:
        return _TorchGenerator.__new__(cls, "cpu")  # the backing generator: see the module docstring

    def __init__(self, index: int | None = None) -> None:
        device = runtime.current_device() if index is None else index
        runtime.device_facts(device)  # raises for a device the program does not have
        session = runtime.session_for(device)  # (its daemon's, with several: libremote/client/servers.py)
        if "generators" not in session.daemon_info.get("features", ()):
            raise RuntimeError(
                f"libremote: the daemon at {session.address} is too old for torch.Generator(device='cuda'); "
                "upgrade it, or seed the default generator with torch.cuda.manual_seed"
            )
        self._index = index
        self._id = next(_ids)
        self._session = session
        self._wire = codec.generator_ext(self._id)
        session.submit([Cmd.GENERATOR, self._id, session.local_device(device)])
        _by_impl[self._cdata] = self

    def __del__(self) -> None:
        session = self.__dict__.get("_session")
        if session is not None:
            try:
                session.release_generator(self._id)
            except Exception:  # interpreter shutdown: nothing left to drop
                pass

    def __repr__(self) -> str:
        return f"<torch._C.Generator object at {id(self):#x}>"

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        """``cuda``, with the index the program gave (``torch.Generator("cuda")`` has none on
        CUDA either)."""
        return torch.device("cuda") if self._index is None else torch.device("cuda", self._index)

    def wire(self, session: Any) -> Any:
        """How this generator travels as an op argument of ``session``."""
        if session is not self._session:
            if not session.closed and not self._session.closed:
                raise RuntimeError(
                    f"libremote: this generator is on {self.device}, and the op's device is on another daemon "
                    f"({session.address}); make the generator on the op's device"
                )
            raise RuntimeError(
                "libremote: this generator belongs to an earlier session (the connection was closed or "
                "re-opened, and the daemon dropped it); create it again"
            )
        return self._wire

    # -- seeding: torch's own argument handling, on the backing generator, then the daemon's ----------
    def manual_seed(self, seed: Any) -> RemoteGenerator:  # type: ignore[override]
        _TorchGenerator.manual_seed(self, seed)
        self._session.submit([Cmd.SEED, _TorchGenerator.initial_seed(self), self._wire])
        return self

    def seed(self) -> int:  # type: ignore[override]
        """A non-deterministic seed, set and returned (as ``CUDAGeneratorImpl::seed``)."""
        seed = _TorchGenerator.seed(self)
        self._session.submit([Cmd.SEED, seed, self._wire])
        return seed

    def initial_seed(self) -> int:  # type: ignore[override]
        return _TorchGenerator.initial_seed(self)

    # -- state: the daemon's generator state, as bytes -------------------------------------------------
    def get_state(self) -> torch.Tensor:  # type: ignore[override]
        """The daemon generator's state as a CPU ``ByteTensor`` (a sync point: ops sent before it
        have advanced it)."""
        state, _ = self._session.request([Cmd.RNG_STATE, self._wire])
        return torch.frombuffer(bytearray(state), dtype=torch.uint8)

    def set_state(self, new_state: Any) -> RemoteGenerator:  # type: ignore[override]
        """Restore a state from :meth:`get_state`; torch's checks and errors (the daemon's torch
        checks the state's size, and the error lands here)."""
        if not isinstance(new_state, torch.Tensor):
            raise TypeError(f"expected a torch.ByteTensor, but got {type(new_state).__name__}")
        if (new_state.dtype != torch.uint8 or new_state.layout != torch.strided
                or new_state.device.type != "cpu" or isinstance(new_state, RemoteTensor)):
            raise TypeError("RNG state must be a torch.ByteTensor")
        seed, _ = self._session.request([Cmd.RNG_STATE, self._wire, bytes(new_state.detach().contiguous().numpy())])
        _TorchGenerator.manual_seed(self, seed)  # the state carries its seed: initial_seed() follows
        return self

    def clone_state(self) -> RemoteGenerator:  # type: ignore[override]
        """A new generator on the same device with a copy of this one's state."""
        clone = RemoteGenerator(self._index)
        return clone.set_state(self.get_state())

    def graphsafe_get_state(self) -> Any:  # type: ignore[override]
        raise NotImplementedError(
            "libremote: graph-safe generator states (torch.cuda.CUDAGraph.register_generator_state) are not "
            "supported for explicit generators; use get_state()/set_state()"
        )

    graphsafe_set_state = graphsafe_get_state  # type: ignore[assignment]

    def get_offset(self) -> int:  # type: ignore[override]
        raise NotImplementedError("libremote: the Philox offset of a device generator is not available; "
                                  "use get_state()/set_state()")

    set_offset = get_offset  # type: ignore[assignment]

    # -- pickling and copying: as CUDA's generators (device, then seed and state) ----------------------
    def __reduce__(self) -> Any:
        return (Generator, (self.device,), (self.initial_seed(), None, self.get_state()))

    def __setstate__(self, state: Any) -> None:
        seed, _offset, rng_state = state
        if rng_state is not None:
            self.set_state(rng_state)
        else:
            self.manual_seed(seed)


def _remote_index(device: Any) -> tuple[bool, int | None]:
    """Whether ``device`` (a ``torch.Generator`` argument) names the remote device, and which."""
    if isinstance(device, int) and not isinstance(device, bool):
        return True, device  # a bare ordinal is an accelerator's, as torch.device(0) is CUDA's
    if isinstance(device, str):
        if not device.startswith(("cuda", backend.BACKEND_NAME)):
            return False, None
        device = torch.device(device)
    if isinstance(device, torch.device) and device.type in ("cuda", backend.BACKEND_NAME):
        return True, device.index
    return False, None


class _GeneratorType(type(_TorchGenerator)):  # type: ignore[misc]
    """``torch.Generator(...)``: a :class:`RemoteGenerator` for the remote device, torch's own
    generator otherwise; every ``torch._C.Generator`` is an instance."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is not Generator:  # a program's own subclass of torch.Generator: torch's construction
            return super().__call__(*args, **kwargs)
        if len(args) + len(kwargs) == 1:
            device = args[0] if args else kwargs.get("device")
            remote, index = _remote_index(device)
            if remote:
                return RemoteGenerator(index)
        return _TorchGenerator(*args, **kwargs)

    def __instancecheck__(cls, instance: Any) -> bool:
        return isinstance(instance, _TorchGenerator)

    def __subclasscheck__(cls, subclass: Any) -> bool:
        return issubclass(subclass, _TorchGenerator)


class Generator(_TorchGenerator, metaclass=_GeneratorType):
    """``torch.Generator`` while libremote is active (see the module docstring)."""


Generator.__module__ = "torch"  # pickles by reference as torch.Generator (see RemoteGenerator.__reduce__)
Generator.__qualname__ = Generator.__name__ = "Generator"
Generator.__doc__ = _original.__doc__


def wire(generator: Any, session: Any) -> Any:
    """An op's ``generator`` argument for the daemon (as ``__torch_dispatch__`` sees it: see
    :data:`_by_impl`): a remote generator's id; a host generator raises CUDA's error for a device
    kernel given a CPU generator."""
    remote = generator if type(generator) is RemoteGenerator else _by_impl.get(generator._cdata)
    if remote is None:
        raise RuntimeError(DEVICE_OP_MESSAGE)
    return remote.wire(session)


def check_host_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Called by the device mode for a torch call with ``generator=`` a remote generator (after
    ``cuda`` became the remote device): unless the call works on remote tensors or makes them, it
    runs on the host, where CUDA raises before touching anything."""
    device = kwargs.get("device")
    if isinstance(device, torch.device) and device.type == backend.BACKEND_NAME:
        return
    for value in (*args, *kwargs.values()):
        if isinstance(value, RemoteTensor):
            return
        if isinstance(value, (list, tuple)) and any(isinstance(item, RemoteTensor) for item in value):
            return
    raise RuntimeError(HOST_OP_MESSAGE)
