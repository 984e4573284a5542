"""No tenant ever reads bytes it did not write: the memory ops hand out is zeroed where they do not
write it themselves.

Every session's tensors come from one allocator per device (CUDA's caching allocator on a GPU;
malloc's heap on the CPU backend, which keeps freed memory for reuse: server/host_memory.py), so
a block one tenant frees is the next block another tenant gets. Most ops write every byte of the
memory they return, and cost nothing here. The rule for the rest comes from the op's name and
schema, not from a hand list of overloads:

* **Fresh uninitialised results**: ops named ``*empty*`` (``empty``, ``empty_like``,
  ``empty_strided``, ``new_empty*``, ``empty_permuted``, the quantized ``*empty*`` factories...).
  The *whole untyped storage* of each result is zeroed, not just the view's elements: an
  ``empty_strided`` with gaps between its elements leaves bytes that ``as_strided`` can still
  read. (A result that aliases an argument, ``empty.out``, is not fresh: see growth.)
* **Storage growth**: ops that may resize a storage (``resize_``, ``resize_as_``, ``set_`` with a
  larger extent, ``out=`` arguments: ``OpEntry.resized_arguments``). The bytes a storage gains
  are zeroed, except those the op itself writes as elements of its ``out=`` tensors. Ops that only
  change sizes (:data:`SIZE_ONLY_OPS`, ``*empty*``) write none of them.
* The functional forms of resizing (``resize``, ``resize_as``, ``_resize_output``, and their
  ``.out`` overloads) clone and grow inside one kernel; they are translated
  (:data:`TRANSLATIONS`) into a clone and the in-place op, whose growth is zeroed.

* **Trimmed results**: ops whose output size depends on their data (schema tag
  ``dynamic_output_shape``: ``unique_consecutive``, ``nonzero``...) may allocate for the worst
  case and shrink the result's sizes, not its storage: ``unique_consecutive`` of 65536 equal floats
  returns one element on a 256 KiB storage. The bytes of each fresh result storage that no result
  shows are zeroed.

* **Results a kernel writes in part**: ``_ctc_loss`` returns its ``log_alpha`` from ``empty``
  and the CPU kernel writes, per batch item, only the time steps below its input length and the
  target positions up to twice its target length (the CUDA kernel writes -inf everywhere else):
  127,559 copies of a freed 2 MiB pattern came back in one (issue 19). Translated
  (:func:`ctc_loss`): the rest is set to -inf, as on CUDA.

Placeholders of a step recorded without running (``Session._allocate_placeholders``) are
allocated zeroed. Spilled storages need nothing: a restore copies the whole storage back from a
host buffer of its exact size, and a storage whose bytes were discarded comes back zeroed
(server/residency.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from . import residency, sparse
from .layouts import is_dense

aten = torch.ops.aten

#: Ops that change a tensor's sizes or storage without writing any element: the bytes a storage
#: gains under them are uninitialised. (``set_data`` is ``t.data = other``.)
SIZE_ONLY_OPS = frozenset({
    "resize_", "resize_as_", "_resize_output_", "set_", "set_data",
    "resize_as_sparse_", "sparse_resize_", "sparse_resize_and_clear_",
})


def returns_uninitialised(op_name: str) -> bool:
    """Whether an op's fresh results are uninitialised memory (every ``*empty*`` op)."""
    return "empty" in op_name


def writes_no_elements(op_name: str) -> bool:
    """Whether the op leaves uninitialised whatever a storage gains under it."""
    return op_name in SIZE_ONLY_OPS or returns_uninitialised(op_name)


def byte_view(storage: torch.UntypedStorage) -> torch.Tensor:
    """The storage's bytes as a flat uint8 tensor (all of them, whatever views use it)."""
    return residency.byte_view(storage, storage.nbytes())


def tensors_of(value: Any) -> Iterator[torch.Tensor]:
    """Tensors in an op's result or argument (lists and tuples included); for a sparse tensor,
    the strided tensors it is made of (sparse.py), whose storages are what is zeroed and charged."""
    if isinstance(value, torch.Tensor):
        if value.layout is not torch.strided and sparse.is_sparse(value):
            yield from sparse.parts(value)
        else:
            yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_of(item)


def zero_fresh_results(result: Any, args: list[Any], kwargs: dict[str, Any]) -> None:
    """Zero the whole storage of every result of an ``*empty*`` op that is a fresh storage (one no
    argument uses: ``empty.out`` returns its ``out``, whose old bytes are the session's own)."""
    taken = {t.untyped_storage()._cdata for t in tensors_of([args, list(kwargs.values())])}
    for tensor in tensors_of(result):
        storage = tensor.untyped_storage()
        if storage._cdata not in taken and storage.nbytes():
            byte_view(storage).zero_()
            taken.add(storage._cdata)


def zero_beyond_results(result: Any, args: list[Any], kwargs: dict[str, Any]) -> None:
    """Zero the bytes of each fresh result storage that are not elements of any result."""
    taken = {t.untyped_storage()._cdata for t in tensors_of([args, list(kwargs.values())])}
    shown: dict[int, tuple[torch.UntypedStorage, list[torch.Tensor]]] = {}
    for tensor in tensors_of(result):
        storage = tensor.untyped_storage()
        if storage._cdata not in taken:
            shown.setdefault(storage._cdata, (storage, []))[1].append(tensor)
    for storage, tensors in shown.values():
        if storage.nbytes():
            _zero_range_except(storage, 0, storage.nbytes(), tensors)


class StorageSizes:
    """The sizes of an op's argument storages before it runs, to zero what they gain in it."""

    __slots__ = ("before",)

    def __init__(self, args: list[Any], kwargs: dict[str, Any]) -> None:
        #: storage key -> (storage, bytes before the op)
        self.before: dict[int, tuple[torch.UntypedStorage, int]] = {}
        for tensor in tensors_of([args, list(kwargs.values())]):
            storage = tensor.untyped_storage()
            self.before.setdefault(storage._cdata, (storage, storage.nbytes()))

    def zero_growth(self, entry: Any, args: list[Any], kwargs: dict[str, Any]) -> None:
        """After ``entry`` (an ``OpEntry``) ran: zero the bytes each storage gained, but for the
        elements of the tensors the op wrote (its ``out=`` arguments, ``resized_arguments``),
        unless it writes no elements at all."""
        covering = [] if writes_no_elements(op_name_of(entry.name)) else written_arguments(entry, args, kwargs)
        for storage, old in self.before.values():
            new = storage.nbytes()
            if new > old:
                _zero_range_except(storage, old, new, [t for t in covering if t.untyped_storage()._cdata == storage._cdata])


def op_name_of(name: str) -> str:
    """``aten::resize_.default`` -> ``resize_``."""
    return name.rsplit("::", 1)[-1].split(".", 1)[0]


def written_arguments(entry: Any, args: list[Any], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors at the op's ``resized_arguments`` (the arguments it writes and may resize)."""
    written: list[torch.Tensor] = []
    for where, key in entry.resized_arguments:
        value = (args[key] if key < len(args) else None) if where == "arg" else kwargs.get(key)
        written.extend(tensors_of(value))
    return written


def _zero_range_except(storage: torch.UntypedStorage, start: int, stop: int, written: list[torch.Tensor]) -> None:
    """Zero bytes ``[start, stop)`` of ``storage`` that are not elements of ``written``."""
    flat = byte_view(storage)
    if not written:
        flat[start:stop].zero_()
        return

    if len(written) == 1 and is_dense(written[0], any_offset=True):
        tensor = written[0]
        first = tensor.storage_offset() * tensor.element_size()
        last = first + tensor.numel() * tensor.element_size()
        if first > start:
            flat[start:min(first, stop)].zero_()
        if last < stop:
            flat[max(last, start):stop].zero_()
        return
    # Several or strided tensors: keep their elements, zero the range, put them back (rare).
    kept = [tensor.clone() for tensor in written]
    flat[start:stop].zero_()
    for tensor, values in zip(written, kept):
        tensor.copy_(values)


# ------------------------------------------------------------------------------------------------
# The functional forms of resizing, as a clone and the in-place op (whose growth is zeroed here)
# ------------------------------------------------------------------------------------------------
def grow(tensor: torch.Tensor, resize: Any) -> torch.Tensor:
    """Run ``resize()`` (an in-place resize of ``tensor``) and zero what its storage gained."""
    sizes = StorageSizes([tensor], {})
    resize()
    for storage, old in sizes.before.values():
        if storage.nbytes() > old:
            byte_view(storage)[old:].zero_()
    return tensor


def _into(result: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return result
    grow(out, lambda: out.resize_(result.shape))
    return out.copy_(result)


def resize(self: torch.Tensor, size: list[int], *, memory_format: Any = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    result = self.clone()
    return _into(grow(result, lambda: result.resize_(size, memory_format=memory_format)), out)


def resize_as(self: torch.Tensor, the_template: torch.Tensor, *, memory_format: Any = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    result = self.clone()
    return _into(grow(result, lambda: result.resize_as_(the_template, memory_format=memory_format)), out)


def resize_output(self: torch.Tensor, size: list[int], device: Any, *, out: torch.Tensor | None = None) -> torch.Tensor:
    result = self.clone()
    return _into(grow(result, lambda: aten._resize_output_(result, size, device)), out)


# ------------------------------------------------------------------------------------------------
# Results a kernel writes in part
# ------------------------------------------------------------------------------------------------
def ctc_loss(log_probs: torch.Tensor, targets: torch.Tensor, input_lengths: Any, target_lengths: Any,
             blank: int = 0, zero_infinity: bool = False, **out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``_ctc_loss`` (every overload: lengths as lists or tensors, ``out0``/``out1``), then the
    parts of ``log_alpha`` the CPU kernel leaves as ``empty`` gave them set to -inf, as the CUDA
    kernel sets them: for batch item ``b``, every time step ``t >= max(1, input_lengths[b])`` and,
    below it, every target position ``s > 2 * target_lengths[b]``. (Row 0 the kernel fills
    itself.) The backward reads none of them."""
    loss, log_alpha = aten._ctc_loss(log_probs, targets, input_lengths, target_lengths, blank, zero_infinity, **out)
    if log_alpha.device.type == "cpu" and log_alpha.dim() == 3 and log_alpha.numel():
        batch, steps, positions = log_alpha.shape
        inputs = torch.as_tensor(input_lengths, dtype=torch.int64).reshape(batch, 1, 1)
        targets_ = torch.as_tensor(target_lengths, dtype=torch.int64).reshape(batch, 1, 1)
        t = torch.arange(steps).reshape(1, steps, 1)
        s = torch.arange(positions).reshape(1, 1, positions)
        written = (t == 0) | ((t < inputs) & (s <= 2 * targets_))
        log_alpha.masked_fill_(~written, -torch.inf)
    return loss, log_alpha


TRANSLATIONS: dict[str, Callable[..., Any]] = {
    "aten::_ctc_loss": ctc_loss,
    "aten::resize": resize,
    "aten::resize_as": resize_as,
    "aten::_resize_output": resize_output,
}
