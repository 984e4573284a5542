"""Every name libremote replaces in torch (and in Python's own modules), in one table.

Layer 4, the torch-facing facade: the table names the replacements, which live in the facade's
modules (and a few in the layers below: the legacy tensor types, explicit generators, the current
device). :func:`.activation.activate` installs it once; nothing uninstalls it (a process that
imported libremote keeps ``cuda`` remote until it exits).

One row per replaced name: where (the dotted name), what goes there, why (one line), and the torch
versions on which the original was read against its replacement. ``tests/test_patches.py`` holds
the table against the installed torch: each original exists, is the kind of object its
replacement stands in for and takes no parameter the replacement does not; after
``import libremote`` each name is its replacement; and no other name of ``torch``, ``torch.cuda``,
``torch.accelerator``, ``torch.Tensor``, ``torch.nn.Module`` or ``torch.serialization`` holds
libremote's code. On a new torch, that test shows what moved.

What else activation changes in torch, none of it a replacement of torch's objects by libremote's:
the PrivateUse1 backend, registered as ``remote`` (:mod:`.registration`: its kernels, the autocast
kernels of :mod:`.amp`, the meta kernels of :mod:`.meta`), and the names torch itself adds for it
(``torch.remote``, ``Tensor.remote``, ``Tensor.is_remote``, ``Module.remote``, ...;
:data:`ADDED_BY_TORCH` lists the one that holds libremote's object); torch's Python meta kernels, taken off the Meta key
where a C++ one exists and registered again in a new ``torch.library.Library``, which also becomes
``torch._meta_registrations._meta_lib_dont_use_me_use_register_meta`` for torch's later
registrations (:func:`.meta._prefer_native_meta_kernels`); the ``cuda`` location tagger and loader
of torch.serialization (:func:`.serialization.register`); the multi-tensor optimizers' list of
supported tensor types (:func:`.optim.register`); and the device mode, entered in the importing
thread (:func:`.device_map.enter_mode`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import (
    amp,
    attention,
    capture,
    cuda_api,
    cuda_graph,
    device_map,
    generators,
    legacy_types,
    parallel,
    parameter_identity,
    runtime,
    serialization,
    warning_location,
)
from . import compile as graph_compile

#: The torch versions the table was checked against: each original read, and its replacement
#: tested, there.
CHECKED = "2.13"


@dataclass(frozen=True)
class Patch:
    name: str  #: where: a dotted name, from its top-level module ("torch.cuda.is_available")
    replacement: Any  #: what goes there
    why: str  #: one line
    checked: str = CHECKED  #: torch versions on which the original was read against the replacement
    #: Installed only where this torch has the name (functions that some releases lack).
    optional: bool = False
    #: Installed only where this holds (a difference between builds of one release).
    when: Callable[[], bool] | None = None


def _cpu_build() -> bool:
    return not hasattr(torch._C, "_nvtx")


_FACTS = "the daemon's device facts"
_SEED = "seeds the session's generators on the daemon"
_SEED_HERE = "as torch.cuda's, for code that imports it from torch.cuda.random"
_RNG = "the state of the session's generator on the daemon"
_MEMORY = "this session's memory on the daemon"
_MEMORY_HERE = "as torch.cuda's: torch.cuda.memory's own functions call it there (memory_summary)"
_ACCELERATOR_MEMORY = "as torch.cuda.memory's, for code written against torch.accelerator"
_STREAMS = "a session's work runs in order on one stream on the daemon; events time it there"
_GRAPHS = "a captured region becomes a daemon-side program; replay() is one command"
_GRAPHS_HERE = "as torch.cuda's, for code that imports it from torch.cuda.graphs"
_LEGACY = "the legacy type API: its instances are the remote tensors of its dtype"
_COMM = "nn.DataParallel moves tensors with it; torch's is C++ CUDA code, absent from a CPU build"
_ACCELERATOR = "torch.accelerator answers as torch.cuda does: the daemon's device is the accelerator"
_TYPES = legacy_types.CUDA_TYPES

TABLE: tuple[Patch, ...] = (
    # torch.cuda: the daemon's devices are this program's GPUs (cuda_api.py, runtime.py)
    Patch("torch.cuda.is_available", cuda_api.is_available, "True when a daemon answers (else False, with a warning)"),
    Patch("torch.cuda.device_count", cuda_api.device_count, "the devices the daemon gave this session"),
    Patch("torch.cuda.current_device", runtime.current_device, "which of the session's devices `cuda` names"),
    Patch("torch.cuda.set_device", runtime.set_device, "chooses among the session's devices"),
    Patch("torch.cuda._exchange_device", runtime.exchange_device, "torch.cuda.device(i) switches devices with it"),
    Patch("torch.cuda._maybe_exchange_device", runtime.exchange_device, "torch.cuda.device(i) switches back with it"),
    Patch("torch.cuda.synchronize", cuda_api.synchronize, "waits for the daemon to run what was sent"),
    Patch("torch.cuda.is_initialized", cuda_api.is_initialized, "whether a session is open"),
    Patch("torch.cuda.init", cuda_api.init, "opens the session"),
    Patch("torch.cuda._lazy_init", cuda_api._lazy_init, "torch calls it before CUDA work; a CPU build's raises"),
    Patch("torch.cuda.get_device_properties", cuda_api.get_device_properties, _FACTS),
    Patch("torch.cuda.get_device_name", cuda_api.get_device_name, _FACTS),
    Patch("torch.cuda.get_device_capability", cuda_api.get_device_capability, _FACTS),
    Patch("torch.cuda.is_bf16_supported", cuda_api.is_bf16_supported, _FACTS),
    Patch("torch.cuda.manual_seed", cuda_api.manual_seed, _SEED),
    Patch("torch.cuda.manual_seed_all", cuda_api.manual_seed_all, _SEED + " (torch.manual_seed calls it)"),
    Patch("torch.cuda.seed", cuda_api.seed, _SEED),
    Patch("torch.cuda.seed_all", cuda_api.seed_all, _SEED),
    Patch("torch.cuda.initial_seed", cuda_api.initial_seed, "the seed last given to the daemon's generators"),
    Patch("torch.cuda.get_rng_state", cuda_api.get_rng_state, _RNG),
    Patch("torch.cuda.set_rng_state", cuda_api.set_rng_state, _RNG),
    Patch("torch.cuda.get_rng_state_all", cuda_api.get_rng_state_all, _RNG),
    Patch("torch.cuda.set_rng_state_all", cuda_api.set_rng_state_all, _RNG),
    Patch("torch.cuda.memory_allocated", cuda_api.memory_allocated, _MEMORY),
    Patch("torch.cuda.max_memory_allocated", cuda_api.max_memory_allocated, _MEMORY),
    Patch("torch.cuda.memory_reserved", cuda_api.memory_reserved, _MEMORY),
    Patch("torch.cuda.max_memory_reserved", cuda_api.max_memory_reserved, _MEMORY),
    Patch("torch.cuda.reset_peak_memory_stats", cuda_api.reset_peak_memory_stats, _MEMORY),
    Patch("torch.cuda.reset_max_memory_allocated", cuda_api.reset_max_memory_allocated, _MEMORY),
    Patch("torch.cuda.empty_cache", cuda_api.empty_cache, _MEMORY),
    Patch("torch.cuda.mem_get_info", cuda_api.mem_get_info, _MEMORY + ", and its device's free and total"),
    Patch("torch.cuda.memory_stats", cuda_api.memory_stats, _MEMORY + ", in the keys of CUDA's allocator"),
    Patch("torch.cuda.set_per_process_memory_fraction", cuda_api.set_per_process_memory_fraction,
          "a cap the daemon enforces on this session"),
    Patch("torch.cuda.Stream", cuda_api.Stream, _STREAMS),
    Patch("torch.cuda.Event", cuda_api.Event, _STREAMS),
    Patch("torch.cuda.current_stream", cuda_api.current_stream, _STREAMS),
    Patch("torch.cuda.default_stream", cuda_api.default_stream, _STREAMS),
    Patch("torch.cuda.set_stream", cuda_api.set_stream, _STREAMS),
    Patch("torch.cuda.stream", cuda_api.stream, _STREAMS),
    Patch("torch.cuda.is_current_stream_capturing", capture.is_capturing,
          "True while a step or a CUDA graph records: optimizers check it"),
    Patch("torch.cuda.CUDAGraph", cuda_graph.CUDAGraph, _GRAPHS),
    Patch("torch.cuda.graph", cuda_graph.graph, _GRAPHS),
    Patch("torch.cuda.graph_pool_handle", cuda_graph.graph_pool_handle, "memory pools are the daemon's"),
    Patch("torch.cuda.ipc_collect", cuda_api.ipc_collect, "nothing is shared through CUDA IPC; a CPU build's raises"),
    Patch("torch.cuda.FloatTensor", _TYPES["FloatTensor"], _LEGACY),
    Patch("torch.cuda.DoubleTensor", _TYPES["DoubleTensor"], _LEGACY),
    Patch("torch.cuda.HalfTensor", _TYPES["HalfTensor"], _LEGACY),
    Patch("torch.cuda.BFloat16Tensor", _TYPES["BFloat16Tensor"], _LEGACY),
    Patch("torch.cuda.ByteTensor", _TYPES["ByteTensor"], _LEGACY),
    Patch("torch.cuda.CharTensor", _TYPES["CharTensor"], _LEGACY),
    Patch("torch.cuda.ShortTensor", _TYPES["ShortTensor"], _LEGACY),
    Patch("torch.cuda.IntTensor", _TYPES["IntTensor"], _LEGACY),
    Patch("torch.cuda.LongTensor", _TYPES["LongTensor"], _LEGACY),
    Patch("torch.cuda.BoolTensor", _TYPES["BoolTensor"], _LEGACY),
    Patch("torch.cuda.graphs.CUDAGraph", cuda_graph.CUDAGraph, _GRAPHS_HERE),
    Patch("torch.cuda.graphs.graph", cuda_graph.graph, _GRAPHS_HERE),
    Patch("torch.cuda.graphs.graph_pool_handle", cuda_graph.graph_pool_handle, _GRAPHS_HERE),
    Patch("torch.cuda.random.manual_seed", cuda_api.manual_seed, _SEED_HERE),
    Patch("torch.cuda.random.manual_seed_all", cuda_api.manual_seed_all, _SEED_HERE),
    Patch("torch.cuda.memory.memory_allocated", cuda_api.memory_allocated, _MEMORY_HERE, optional=True),
    Patch("torch.cuda.memory.max_memory_allocated", cuda_api.max_memory_allocated, _MEMORY_HERE, optional=True),
    Patch("torch.cuda.memory.memory_reserved", cuda_api.memory_reserved, _MEMORY_HERE, optional=True),
    Patch("torch.cuda.memory.max_memory_reserved", cuda_api.max_memory_reserved, _MEMORY_HERE, optional=True),
    Patch("torch.cuda.memory.reset_peak_memory_stats", cuda_api.reset_peak_memory_stats, _MEMORY_HERE, optional=True),
    Patch("torch.cuda.memory.empty_cache", cuda_api.empty_cache, _MEMORY_HERE, optional=True),
    Patch("torch.cuda.memory.mem_get_info", cuda_api.mem_get_info, _MEMORY_HERE, optional=True),
    Patch("torch.cuda.memory.memory_stats", cuda_api.memory_stats, _MEMORY_HERE, optional=True),
    Patch("torch.cuda.memory.set_per_process_memory_fraction", cuda_api.set_per_process_memory_fraction,
          _MEMORY_HERE, optional=True),
    Patch("torch.cuda.nvtx._nvtx", cuda_api._NoNVTX(), "a CPU build's NVTX stub raises: ranges are accepted, counted",
          when=_cpu_build),
    # torch.accelerator: the same answers (cuda_api.py, runtime.py)
    Patch("torch.accelerator.is_available", cuda_api.is_available, _ACCELERATOR),
    Patch("torch.accelerator.device_count", cuda_api.device_count, _ACCELERATOR),
    Patch("torch.accelerator.current_accelerator", cuda_api._current_accelerator, "`cuda`: the daemon's device"),
    Patch("torch.accelerator.current_device_index", runtime.current_device, _ACCELERATOR),
    Patch("torch.accelerator.current_device_idx", runtime.current_device, _ACCELERATOR),
    Patch("torch.accelerator.set_device_index", runtime.set_device, _ACCELERATOR),
    Patch("torch.accelerator.set_device_idx", runtime.set_device, _ACCELERATOR),
    Patch("torch.accelerator.synchronize", cuda_api.synchronize, _ACCELERATOR),
    Patch("torch.accelerator.current_stream", cuda_api.current_stream, _ACCELERATOR + " (optimizers ask it)"),
    Patch("torch.accelerator.memory.memory_allocated", cuda_api.memory_allocated, _ACCELERATOR_MEMORY, optional=True),
    Patch("torch.accelerator.memory.max_memory_allocated", cuda_api.max_memory_allocated, _ACCELERATOR_MEMORY,
          optional=True),
    Patch("torch.accelerator.memory.memory_reserved", cuda_api.memory_reserved, _ACCELERATOR_MEMORY, optional=True),
    Patch("torch.accelerator.memory.max_memory_reserved", cuda_api.max_memory_reserved, _ACCELERATOR_MEMORY,
          optional=True),
    Patch("torch.accelerator.memory.reset_peak_memory_stats", cuda_api.reset_peak_memory_stats, _ACCELERATOR_MEMORY,
          optional=True),
    Patch("torch.accelerator.memory.empty_cache", cuda_api.empty_cache, _ACCELERATOR_MEMORY, optional=True),
    Patch("torch.accelerator.memory.memory_stats", cuda_api.memory_stats, _ACCELERATOR_MEMORY, optional=True),
    # The rest of torch where a program meets CUDA
    Patch("torch.backends.cudnn.is_acceptable", cuda_api._cudnn_is_acceptable,
          "cuDNN is the daemon's: nn.RNN's weight flattening must not try it on the client"),
    Patch("torch.nn.parallel.comm.broadcast", parallel.broadcast, _COMM),
    Patch("torch.nn.parallel.comm.broadcast_coalesced", parallel.broadcast_coalesced, _COMM),
    Patch("torch.nn.parallel.comm.reduce_add", parallel.reduce_add, _COMM),
    Patch("torch.nn.parallel.comm.reduce_add_coalesced", parallel.reduce_add_coalesced, _COMM),
    Patch("torch.nn.parallel.comm.scatter", parallel.scatter, _COMM),
    Patch("torch.nn.parallel.comm.gather", parallel.gather, _COMM),
    Patch("torch.set_default_device", device_map.set_default_device, "`cuda` (or an ordinal) means the remote device"),
    Patch("torch.get_default_device", device_map.get_default_device, "reports the remote device as `cuda`"),
    Patch("torch.Tensor.record_stream", device_map._record_stream,
          "torch's argument parser refuses libremote's Stream before the device mode sees the call"),
    Patch("torch.Generator", generators.Generator, "torch.Generator('cuda') makes a generator on the daemon"),
    Patch("torch._utils._rebuild_tensor_v2", serialization._rebuild_tensor_v2,
          "tensors torch.load rebuilds on `cuda` storages move to the remote device"),
    Patch("torch.serialization._save", serialization._save,
          "a save scope: each daemon storage is fetched and written once, so ties survive"),
    Patch("torch.serialization._legacy_save", serialization._legacy_save,
          "a save scope, as for _save (the legacy format)"),
    Patch("torch.compile", graph_compile.compile,
          "graph mode: aten graphs traced on meta run on the daemon (Dynamo cannot trace remote tensors)"),
    Patch("torch.nn.functional.scaled_dot_product_attention", attention._patched,
          "nn.MultiheadAttention calls it where the device mode is off: one fused remote op"),
    Patch("torch.nn.Module._apply", parameter_identity._apply,
          "model.cuda()/.to()/.cpu() keep the Parameter objects, as on CUDA"),
    Patch("torch.autocast.__enter__", amp._autocast_enter, "autocast('cuda') turns on the remote device's too"),
    Patch("torch.autocast.__exit__", amp._autocast_exit, "and switches it back"),
    # Python's own
    Patch("threading.Thread._bootstrap_inner", device_map._bootstrap_inner_with_mode,
          "torch-function modes are per thread: every new thread enters the device mode"),
    Patch("warnings._showwarnmsg", warning_location._showwarnmsg,
          "warnings point at the program's line, not at libremote's frames"),
)

#: Names torch itself sets when :mod:`.registration` registers the backend, holding libremote's
#: objects: not replacements, not installed from the table.
ADDED_BY_TORCH = {
    "torch.remote": "the backend's module (registration._BackendModule): is_available, device_count, seeding",
}


def owner_of(name: str) -> tuple[Any, str]:
    """The object that holds ``name``'s last part, and that part: ``torch.cuda.memory.empty_cache``
    -> (the module ``torch.cuda.memory``, ``"empty_cache"``)."""
    path, _, attribute = name.rpartition(".")
    parts = path.split(".")
    owner: Any = importlib.import_module(parts[0])
    for index, part in enumerate(parts[1:], 2):
        try:
            owner = getattr(owner, part)
        except AttributeError:
            owner = importlib.import_module(".".join(parts[:index]))
    return owner, attribute


def applies(patch: Patch) -> bool:
    """Whether ``patch`` is installed in this process (see :attr:`Patch.optional`, :attr:`Patch.when`)."""
    if patch.when is not None and not patch.when():
        return False
    if patch.optional:
        owner, attribute = owner_of(patch.name)
        return hasattr(owner, attribute)
    return True


_ABSENT = object()
#: What each installed name held before: ``install`` keeps it for the tests and for reading.
_originals: dict[str, Any] = {}


def install() -> None:
    """Put every replacement of the table in place (once)."""
    if _originals:
        return
    for patch in TABLE:
        if not applies(patch):
            continue
        owner, attribute = owner_of(patch.name)
        _originals[patch.name] = getattr(owner, attribute, _ABSENT)
        setattr(owner, attribute, patch.replacement)


def originals() -> dict[str, Any]:
    """Name -> what it held before :func:`install` (absent names are left out)."""
    return {name: value for name, value in _originals.items() if value is not _ABSENT}
