"""Registers the ``remote`` device with torch: PrivateUse1, renamed, driven from Python.

Layer 4, the torch-facing facade: the layers below, given to torch.

``torch.utils.backend_registration._setup_privateuseone_for_python_backend`` (torch >= 2.6; see
torch's test/test_privateuseone_python_backend.py) installs the hooks, device guard and backend
module that the autograd engine and factory functions expect from a C++ backend. Two more pieces:

* a PrivateUse1 *fallback* kernel: ops that reach the PrivateUse1 key without a RemoteTensor
  argument are factory calls (``torch.empty(..., device="remote:0")``, and the allocations that
  C++ composite kernels make with ``self.options()``); they are forwarded like any other op, so
  every tensor with the remote device is a RemoteTensor;
* the backend module ``torch.remote`` (``is_available``, ``device_count``, seeding, AMP dtypes).

Registration happens once per process and cannot be undone (torch allows one PrivateUse1 name).
It also connects the layers below to each other where the lower one cannot import the upper:
remote tensors get their op path and their pickling (:func:`.tensor.bind`, :func:`.sparse.bind`),
and the op path the copies between host and daemon (:func:`.dispatch.handle_specially`).
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from ..config import Settings
from . import amp, cuda_api, device_guard, meta, serialization, sparse, sparse_dispatch, sync, tensor
from .backend import BACKEND_NAME
from .dispatch import dispatch, handle_specially

_registered = False
_lock = threading.Lock()
_libraries: list[torch.library.Library] = []


class _BackendModule:
    """``torch.remote``: what torch asks of a backend's Python module."""

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def is_initialized() -> bool:
        return True

    @staticmethod
    def _is_in_bad_fork() -> bool:
        return False

    @staticmethod
    def device_count() -> int:
        return cuda_api.device_count()

    @staticmethod
    def current_device() -> int:
        return cuda_api.current_device()

    @staticmethod
    def manual_seed_all(seed: int) -> None:
        cuda_api.manual_seed_all(seed)

    @staticmethod
    def manual_seed(seed: int) -> None:
        cuda_api.manual_seed(seed)

    @staticmethod
    def get_amp_supported_dtype() -> list[torch.dtype]:
        return [torch.float16, torch.bfloat16, torch.float32]


def _fallback(op: torch._ops.OpOverload, *args: Any, **kwargs: Any) -> Any:
    return dispatch(op, args, kwargs)


_OPS_WITH_KERNELS = ("_to_copy", "copy_", "_copy_from", "_copy_from_and_resize")

#: Ops with a CompositeImplicitAutograd kernel *and* device kernels. The dispatcher decomposes
#: them on a backend without a kernel of its own (``AutogradPrivateUse1`` gets the math kernel),
#: while CUDA and the CPU run their fused kernel and differentiate it with the op's own autograd
#: formula. Decomposed, ``silu_backward`` rounds differently (``math_silu_backward``'s
#: ``grad * sig * (1 + x * (1 - sig))`` in five ops against the kernel's one expression), so a
#: SwiGLU model's gradients were off by an ulp. A PrivateUse1 kernel of ours makes them one op.
#: (``native_channel_shuffle`` is also composite with a CPU kernel, but CUDA decomposes it.)
_OPS_FUSED_ON_CUDA = ("silu_backward", "mish_backward")


def _kernel_for(name: str) -> Any:
    def kernel(*args: Any, **kwargs: Any) -> Any:
        op = getattr(torch.ops.aten, name).default
        return dispatch(op, args, kwargs)

    kernel.__name__ = f"remote_{name}"
    return kernel


def register() -> None:
    """Make ``remote`` a torch device backed by libremote (idempotent)."""
    global _registered
    with _lock:
        if _registered:
            return
        current = torch._C._get_privateuse1_backend_name()
        if current not in ("privateuseone", BACKEND_NAME):
            raise RuntimeError(
                f"libremote needs torch's PrivateUse1 backend, but it is already taken by {current!r}"
            )
        from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

        tensor.bind(dispatch, serialization.reduce_remote_tensor)
        sparse.bind(sparse_dispatch.dispatch, serialization.reduce_sparse)
        handle_specially(sync.SPECIAL_OPS)
        if current == "privateuseone":
            # Several remote devices need a guard that reports them all (see device_guard.py);
            # it must be registered before torch's Python guard, which is first-wins.
            device_guard.install(Settings.from_env().devices)
            _setup_privateuseone_for_python_backend(BACKEND_NAME, backend_module=_BackendModule())
        library = torch.library.Library("_", "IMPL")
        library.fallback(_fallback, "PrivateUse1")
        # Factories of sparse layouts (``torch.zeros(..., layout=torch.sparse_coo, device=...)``)
        # dispatch to the sparse keys of the backend: forwarded the same way (see sparse.py).
        library.fallback(_fallback, "SparsePrivateUse1")
        library.fallback(_fallback, "SparseCsrPrivateUse1")
        _libraries.append(library)
        # Some C++ paths (torch.tensor(data, device=...)) call ops with the Python key excluded,
        # so RemoteTensor.__torch_dispatch__ is skipped and the PrivateUse1 kernel runs. torch's
        # Python *fallback* cannot take tensor-subclass arguments there (an internal assert), so
        # the ops those paths use get real PrivateUse1 kernels.
        aten_library = torch.library.Library("aten", "IMPL")
        for name in _OPS_WITH_KERNELS + _OPS_FUSED_ON_CUDA:
            aten_library.impl(name, _kernel_for(name), "PrivateUse1")
        _libraries.append(aten_library)
        _libraries.extend(amp.register())
        meta.register_missing_meta_kernels()
        _registered = True
