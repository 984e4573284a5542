"""The rules that decide which aten overloads a client may run, from facts of their schemas.

The daemon is a trust boundary between tenants: an op runs only if a rule below says why its
kernel is safe to hand arguments a hostile client chose. :func:`classify` reads an overload's
schema (argument and return types, alias annotations, tags, its name) into :class:`Facts` and
applies :data:`RULES` in order; the first rule that matches decides. Refusing rules come first
(they name the hazards), then the rules that allow (each says what checks the kernel's inputs),
and an overload no rule allows is refused: nothing runs because nobody thought to list it.

Why this module is ~900 lines: it is a table (the rules in order, each with its reason and the
families it names) that a reviewer must read top to bottom to know what a tenant may run;
splitting it would hide the order that decides. The per-call checks live in call_checks.py.

Refused (in order):

``unexpressible``   an argument or result of a type the wire has no business carrying (Storage,
                    Stream, a non-optional Generator, TorchScript classes, dicts, QScheme): these
                    ops reach raw storages, streams or opaque objects.
``host_io``         reads files on the daemon's host (a ``filename`` argument: ``from_file``).
``unchecked``       the name says the kernel skips its checks (``*unsafe*``, ``*_helper``:
                    ``_unsafe_index``, ``_sparse_coo_tensor_unsafe``, ``_cummax_helper`` write
                    where their caller promised it was safe). Where "unsafe" means only that
                    autograd does not track the view (``_unsafe_view``, ``unsafe_split``), the
                    kernel checks its sizes: :data:`UNSAFE_FOR_AUTOGRAD_ONLY` lists those.
``device_assert``   asserts (``_assert_async``...): a failed device-side assert poisons the CUDA
                    context of every tenant on the device.
``test_hook``       ``_test_*`` ops: torch's own test scaffolding.
``non_strided``     makes or reads tensors that are not strided tensors over a storage (or
                    sparse ones the worker can check): mkldnn, quantized, nested/jagged,
                    functorch-batched, zero tensors, packed weights, semi-structured sparsity
                    (:data:`NON_STRIDED_FAMILIES`): their results have no storage the daemon can
                    charge or free, and their kernels trust invariants nobody checks.
``process_state``   no tensor in and no tensor out (``_cufft_set_plan_cache_max_size``,
                    ``_nnpack_available``): all such an op can reach is process-wide state; and
                    the RNN kernels that keep a process-wide dropout state per device
                    (:data:`PROCESS_STATE_OPS`).
``trusts_saved_indices``  backward kernels that index with their forward's bookkeeping tensors
                    unchecked and have no check here (``_segment_reduce_backward``'s
                    ``lengths``/``offsets``, Sobol state; found by probing).
``unvalidated_geometry``  a view built from explicit sizes and strides over an input's storage
                    that has no bounds check here (see ``geometry_checked`` below).
``no_effect``       returns nothing and writes nothing, and is no host check (``_backward``):
                    its only effects are outside tensors.

``sparse_unaudited``  sparse kernels that read a client's index tensors before a sparse tensor
                    exists to check, leave indices unwritten, or are backward kernels combining a
                    gradient with a forward's structure (:data:`SPARSE_UNAUDITED`).

Allowed:

``sparse``          the ops of COO and compressed sparse tensors (:data:`SPARSE_FAMILY`): the
                    worker checks every sparse result with torch's invariant checks before it
                    gets a handle and every sparse tensor an op wrote after it, and keeps the
                    storage of sparse indices out of any strided handle (server/worker/sparse.py),
                    so sparse kernels meet valid indices only.
``shape_checked``   backward kernels that trust their saved tensors' shapes (softmax, layer norm:
                    :data:`SAME_SHAPE`): allowed with a per-call check that the shapes agree.
``channel_checked`` batch norm (its kernels index per-channel tensors unchecked): allowed with a
                    per-call check that each holds one element per input channel.
``index_checked``   an index tensor the kernel trusts (pooling backward's ``indices``, CTC's
                    ``targets``, :data:`INDEX_BOUNDS`): allowed with a per-call range check.
``bags_checked``    embedding bag (:data:`EMBEDDING_BAG_FORWARD`, :data:`EMBEDDING_BAG_BACKWARD`): the
                    CUDA forward reads ``indices`` and ``offsets`` unchecked, the backward kernels
                    index with the forward's ``offset2bag``, ``bag_size``, ``maximum_indices`` and
                    ``offsets`` unchecked; allowed with a per-call check of each one's dtype,
                    shape and value range against ``weight``, ``grad`` and ``num_weights``.
``geometry_checked``  explicit ``size`` and ``stride`` over an input's storage (``as_strided*``,
                    ``_reshape_alias*``, ``set_.source_Tensor_storage_offset``): allowed with a
                    per-call check that the view lies inside that storage
                    (:func:`view_outside_storage`), before the kernel runs. (So ``set_`` no longer
                    grows its source's storage to fit a view past its end: it refuses.)
``factory``         no tensor inputs (or ``new_*``, whose ``self`` gives dtype and device only):
                    a fresh storage sized from its own arguments.
``view``            returns an alias of an input and takes no explicit strides: view kernels
                    derive strides from the input's own geometry and check dims and ranges.
``pointwise``       tagged ``pointwise``: TensorIterator broadcasts and checks shapes and dtypes.
``reduction``       tagged ``reduction``: dims are wrapped and checked against the input.
``host_check``      validation ops that raise on the host and change nothing
                    (``_linalg_check_errors``, which ``linalg.inv`` and friends call).
``query``           reads tensors and returns plain values (``_local_scalar_dense``, ``equal``).
``in_place_or_out`` writes ``self`` or kwarg-only ``out=`` tensors: the kernel checks ``self``'s
                    shape or resizes the outs (``resize_output``) before writing.
``dense_kernel``    strided tensors in, fresh tensors out, every other argument a plain value:
                    ATen's dense kernels check shapes and index ranges of their arguments.

Per-call checks, decided here once per overload (an op that has none pays nothing per call):

* enum arguments (``ScalarType``, ``Layout``, ``MemoryFormat``) must hold the wire's own values
  (``torch.dtype`` and so on): torch accepts raw integers for them and an integer outside the
  enum crashes the daemon. A layout must be ``strided`` or sparse (COO, CSR, CSC, BSR, BSC); a
  dtype must not be quantized.
* ``Device`` arguments must name one of the session's devices (the wire's ``DeviceRef``
  resolves only to those): a string or an integer there could name another GPU, the host or
  another backend (``privateuseone`` is libremote's own client backend, loaded in the daemon
  too). The session's devices are its whole binding: on a GPU daemon no op makes tensors in the
  daemon's host memory (the only host tensors are the small ones sent inline as arguments, and a
  result on any device not the session's is refused when stored).
* varlen attention offsets (:data:`UNCHECKED_OFFSET_ARGUMENTS`) must be None: the device kernels
  read them without bounds checks; dense attention passes none.
* explicit geometry (``geometry_checked``) must lie inside its storage.
* ``out=`` tensors must not overlap themselves (:func:`out_outside_storage`): kernels that are no
  TensorIterator write ``numel`` consecutive elements there.
* trusted index tensors (``index_checked``) must lie inside the tensor they index.
* embedding bag's indices and offsets must lie inside the weight and the indices, and its
  backward's bookkeeping must be what a forward could have made for this gradient
  (``bags_checked``: :func:`embedding_bag_forward_mismatch`, :func:`embedding_bag_backward_mismatch`).
* batch norm's per-channel tensors (``channel_checked``) must hold one element per channel, and
  the saved tensors of ``shape_checked`` backward kernels must fit the gradient.
* kernels found to trust their arguments' shapes, dtypes, layouts or values, by probing and by
  fuzzing allowed ops with hostile tensors (``_cdist_backward``, the fused optimizers,
  ``segment_reduce``, weight norm, ``repeat_interleave``, ``_ctc_loss_backward``, the foreach
  ops' list lengths, fixed-size lists of padding and slow-convolution kernels...), are checked by
  server/worker/call_checks.py: their arguments must fit each other as the kernel assumes. That
  check is added to whichever rule allowed the op (:func:`call_checks.check_for`).

Results are checked once more when the daemon stores them (``values.unstorable``): a tensor that
is neither strided nor a valid sparse tensor, has no storage or lies on a device not the
session's is refused there too.

Why one module of this size: the rules are one ordered table, and each rule's per-call check
sits beside it; split, the order that decides (refusing rules first) would be spread over files.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import call_checks
from .sparse import SPARSE_LAYOUTS

#: Argument types (``Argument.real_type``) a kernel may take from a client: tensors, plain values
#: and the enums and devices the wire carries as its own extension types.
SAFE_ARGUMENT_TYPES = frozenset({
    "Tensor", "Optional[Tensor]", "List[Tensor]", "List[Optional[Tensor]]",
    "int", "Optional[int]", "List[int]", "Optional[List[int]]",
    "float", "Optional[float]", "List[float]", "Optional[List[float]]",
    "bool", "Optional[bool]", "List[bool]",
    "number", "Optional[number]", "List[number]", "complex",
    "str", "Optional[str]",
    "ScalarType", "Optional[ScalarType]", "Layout", "Optional[Layout]",
    "MemoryFormat", "Optional[MemoryFormat]", "Device", "Optional[Device]",
    "Optional[Generator]",  # None (the session supplies its own) or one of the session's generators (GENERATOR)
})
#: Result types the daemon can store or send back.
SAFE_RETURN_TYPES = frozenset({
    "Tensor", "Optional[Tensor]", "List[Tensor]", "int", "float", "bool", "number", "complex",
    "ScalarType", "SymInt", "SymBool", "SymFloat",
})

#: Ops named "unsafe" only because autograd does not track them as views: their kernels check
#: sizes like their safe twins (``view``, ``split``, ``chunk``).
UNSAFE_FOR_AUTOGRAD_ONLY = frozenset({"_unsafe_view", "unsafe_split", "unsafe_split_with_sizes", "unsafe_chunk"})

#: Families of ops on tensors that are not strided tensors over a storage, by name.
NON_STRIDED_FAMILIES: dict[str, re.Pattern[str]] = {
    # (COO and compressed sparse tensors are allowed by the ``sparse`` rule: SPARSE_FAMILY.)
    "semi_structured": re.compile(r"^_cslt|semi_structured"),
    "mkldnn": re.compile(r"mkldnn|onednn"),
    "quantized": re.compile(r"(?<!fake_)quantiz(e|ed)(?!_fake)|^q_|^qscheme$|^int_repr$|affine_quantized"
                            r"|^_make_per_(tensor|channel)|fbgemm|^_wrapped_|int4pack|int8pack|^_dyn_quant"
                            r"|^_choose_qparams"),
    "nested": re.compile(r"nested|jagged|padded_tensor|^_padded_dense"),
    "functorch": re.compile(r"batch_dim|^_make_dual|^_unpack_dual|^_fw_primal|^_functionalize|zerotensor"
                            r"|^_make_dep_token|^_propagate_xla_data|^_new_zeros_with_same_feature_meta"),
}

#: The ops of sparse tensors (COO, CSR, CSC, BSR, BSC), by name: constructors, accessors,
#: conversions, sparse kernels. Allowed by the ``sparse`` rule, because the worker keeps every
#: sparse tensor under a handle valid (server/worker/sparse.py): each sparse result is checked
#: with torch's invariant checks before it is stored and each one an op wrote in place after it,
#: and no strided handle shares a storage with a sparse tensor's indices. (Generic ops, ``mm``,
#: ``add``, ``mul``, meet sparse arguments too: under their own rules, on the same invariant.)
SPARSE_FAMILY = re.compile(r"sparse|^_?(indices|values|crow_indices|col_indices|ccol_indices|row_indices)$"
                           r"|coalesce|^_?nnz$|^(sparse|dense)_dim$|^_dim[IV]$|^(hspmm|smm|sspaddmm|_spdiags)$"
                           r"|^_?to_dense$|^_convert_indices_from_")
#: Sparse ops whose kernels read client-chosen strided tensors as addresses before any sparse
#: tensor exists to validate (``_convert_indices_from_csr_to_coo`` walks ``crow_indices`` as
#: offsets into its output; ``_spdiags`` places diagonals at given offsets), allocate indices they
#: do not write (``_sparse_compressed_tensor_with_dims`` with nnz > 0), or are backward kernels
#: that combine a gradient with the forward's structure (not audited: sparse softmax and sum
#: backward, sparse embedding gradients).
SPARSE_UNAUDITED = re.compile(r"_backward|^_convert_indices_from_|^_spdiags$|^_sparse_compressed_tensor_with_dims$")

#: Ops that keep process-wide state across tenants although they take tensors: cuDNN's and
#: MIOpen's RNN kernels cache a dropout state per device (and take a caller-sized state buffer).
PROCESS_STATE_OPS = re.compile(r"^_cudnn_rnn|^_cudnn_init_dropout_state$|^miopen_rnn|^_cufft_")

#: Backward kernels that index with bookkeeping tensors their forward made (segment ``lengths``
#: and ``offsets``, Sobol state) or trust their shapes (``_thnn_differentiable_*``, the double
#: backward of fused RNN cells) and trust them: a forged one crashes the daemon (found by probing
#: each with out-of-range values). No check here covers them yet (embedding-bag backward, which
#: was here too, has one: :data:`EMBEDDING_BAG_BACKWARD`).
TRUSTS_SAVED_INDICES = re.compile(r"^_segment_reduce_backward$|^_sobol_engine_|^_thnn_differentiable_")

#: Embedding-bag backward kernels (aten/src/ATen/native/EmbeddingBag.cpp, cuda/EmbeddingBag.cu,
#: cuda/EmbeddingBackwardKernel.cu). They index, without bounds checks: the weight's gradient with
#: ``indices`` (and, in mode max, with ``maximum_indices``: one word per bag and feature, -1 for
#: an empty bag); ``grad``'s rows and ``bag_size`` with ``offset2bag`` (one bag per index);
#: ``per_sample_weights`` at every index. ``_embedding_bag_backward`` (and the CPU
#: ``per_sample_weights`` backward) rebuild an empty ``offset2bag`` from ``offsets`` with an
#: index_add_ and a cumsum, which go out of bounds unless the offsets start at 0, never decrease
#: and stay inside ``indices``. Checked per call (:func:`embedding_bag_backward_mismatch`).
#: ``_embedding_bag_sparse_backward`` makes a sparse gradient: refused as ``non_strided``.
EMBEDDING_BAG_BACKWARD = frozenset({"_embedding_bag_backward", "_embedding_bag_dense_backward",
                                    "_embedding_bag_per_sample_weights_backward"})
#: Embedding-bag forward: the CUDA kernel walks each bag from ``offsets[bag]`` to the next offset
#: reading ``indices`` there, and reads ``weight``'s row of each index, with only device-side
#: asserts (an index >= the rows, offsets that decrease), which end the CUDA context of every
#: tenant, and no check at all of a negative index or of offsets past ``indices``' end. Checked
#: per call (:func:`embedding_bag_forward_mismatch`), like the backward kernels.
EMBEDDING_BAG_FORWARD = frozenset({"embedding_bag", "_embedding_bag", "_embedding_bag_forward_only"})
#: Embedding bag's ``mode`` argument.
EMBEDDING_BAG_SUM, EMBEDDING_BAG_MEAN, EMBEDDING_BAG_MAX = 0, 1, 2
#: The dtypes embedding bag's index and bookkeeping tensors may have.
INDEX_DTYPES = (torch.int32, torch.int64)

#: Ops whose kernels trust an index tensor argument (pooling backward's argmax ``indices``, CTC's
#: ``targets``, embedding backward's ``indices``): op name -> (index argument, the tensor it
#: indexes, how many trailing dims of that tensor the index runs over; or an integer argument
#: that counts what it indexes, with 0). Checked per call: 0 <= index < that many elements. (On a
#: GPU this reads the index's min and max back: one sync per call of these few ops.) A composite
#: op (CompositeImplicitAutograd) runs its inner kernels inside its own call, never through the
#: daemon's checks: a composite wrapper of one of these kernels is listed here too.
INDEX_BOUNDS: dict[str, tuple[str, str, int]] = {
    "max_pool2d_with_indices_backward": ("indices", "self", 2),
    "max_pool3d_with_indices_backward": ("indices", "self", 3),
    "adaptive_max_pool2d_backward": ("indices", "self", 2),
    "adaptive_max_pool3d_backward": ("indices", "self", 3),
    "fractional_max_pool2d_backward": ("indices", "self", 2),
    "fractional_max_pool3d_backward": ("indices", "self", 3),
    "_ctc_loss": ("targets", "log_probs", 1),
    "_ctc_loss_backward": ("targets", "log_probs", 1),
    "embedding_dense_backward": ("indices", "num_weights", 0),
    # Composite wrappers of the kernels above: they call the inner kernel directly, past the
    # daemon, so its check must be theirs too (issue 19: embedding_backward with indices
    # [2**40, -2**40] and scale_grad_by_freq, ctc_loss with a target of 2**40, crashed the daemon).
    "embedding_backward": ("indices", "num_weights", 0),
    "ctc_loss": ("targets", "log_probs", 1),
    "_cudnn_ctc_loss": ("targets", "log_probs", 1),
    "miopen_ctc_loss": ("targets", "log_probs", 1),
}

#: Batch norm kernels read (and in training write) their per-channel tensors at every channel of
#: ``input`` without checking their sizes: a 1-element ``running_mean`` for 3 channels is written
#: past its end. These arguments must hold exactly ``input.size(1)`` elements, checked per call.
CHANNEL_CHECKED_OPS = re.compile(r"batch_norm")
CHANNEL_ARGUMENTS = frozenset({"weight", "bias", "running_mean", "running_var", "save_mean", "save_invstd",
                               "save_var", "save_var_transform", "mean", "invstd", "sum_dy", "sum_dy_xmu"})

#: Backward kernels that read their saved tensors at the gradient's every element without
#: checking that the shapes agree (``_log_softmax_backward_data`` with a 200x300 gradient and a
#: 2x3 output reads 60,000 floats of whatever lies past the output: another tenant's data).
#: op name -> arguments that must have one shape.
SAME_SHAPE: dict[str, tuple[str, ...]] = {
    "_softmax_backward_data": ("grad_output", "output"),
    "_log_softmax_backward_data": ("grad_output", "output"),
    "_masked_softmax_backward": ("grad_output", "output"),
    "native_layer_norm_backward": ("grad_out", "input"),
    "_fused_rms_norm_backward": ("grad_out", "input"),
}
#: Normalisation backward kernels and their saved per-row statistics and per-element affine
#: tensors: op name -> (statistics, affine). Checked against ``input`` and ``normalized_shape``.
NORM_STATISTICS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "native_layer_norm_backward": (("mean", "rstd"), ("weight", "bias")),
    "_fused_rms_norm_backward": (("rstd",), ("weight",)),
}

#: Validation ops that only raise on the host.
HOST_CHECK_OPS = re.compile(r"^_linalg_check_errors$|^_validate_")

#: Varlen attention offsets: read by the device kernels without bounds checks.
UNCHECKED_OFFSET_ARGUMENTS = frozenset({"cum_seq_q", "cum_seq_k", "cu_seqlens_q", "cu_seqlens_k",
                                        "seqused_k", "seqlen_k", "block_table"})

ENUM_TYPES = {"ScalarType": torch.dtype, "Layout": torch.layout, "MemoryFormat": torch.memory_format}
QUANTIZED_DTYPES = frozenset({torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4})


@dataclass(frozen=True)
class Facts:
    """What the rules read from one overload's schema."""

    name: str  # "aten::add.Tensor"
    namespace: str
    op: str  # "add"
    arguments: tuple[tuple[str, str, bool], ...]  # (name, real type, kwarg-only)
    return_types: tuple[str, ...]
    tags: frozenset[str]
    takes_tensor: bool  # a tensor argument other than a kwarg-only out= tensor
    returns_tensor: bool
    writes_self_or_out: bool  # writes its first argument or a kwarg-only (out=) argument
    writes_other: bool  # writes a positional argument other than the first
    returns_alias: bool  # a result aliases an input without writing it (a view)
    explicit_geometry: bool  # takes both ``size`` and ``stride`` (a memory layout)

    @classmethod
    def of(cls, overload: torch._ops.OpOverload) -> Facts:
        schema = overload._schema
        namespace, _, rest = schema.name.partition("::")
        name = f"{schema.name}.{schema.overload_name}" if schema.overload_name else schema.name
        arguments = tuple((a.name, str(a.real_type), a.kwarg_only) for a in schema.arguments)
        return_types = tuple(str(r.real_type) for r in schema.returns)
        writes = [(i, a) for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write]
        names = {a.name for a in schema.arguments}
        return cls(
            name=name,
            namespace=namespace,
            op=rest,
            arguments=arguments,
            return_types=return_types,
            tags=frozenset(str(t).removeprefix("Tag.") for t in overload.tags),
            takes_tensor=any("Tensor" in str(a.real_type) and not (a.kwarg_only and a.alias_info is not None)
                             for a in schema.arguments),
            returns_tensor=any("Tensor" in t for t in return_types),
            writes_self_or_out=any(i == 0 or a.kwarg_only for i, a in writes),
            writes_other=any(i > 0 and not a.kwarg_only for i, a in writes),
            returns_alias=any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns),
            explicit_geometry={"size", "stride"} <= names,
        )


@dataclass(frozen=True)
class Rule:
    name: str
    allows: bool
    #: Why: for an allowing rule, what checks the kernel's inputs; for a refusing one, the hazard.
    why: str
    applies: Callable[[Facts], bool]


def _geometry_over_input(f: Facts) -> bool:
    return f.explicit_geometry and f.takes_tensor and not f.op.startswith("new_")


#: Overloads with explicit geometry whose bounds this module checks (``geometry_checked``):
#: op name -> (tensor whose storage the view lies in, size, stride, storage offset or None for
#: that tensor's own offset).
GEOMETRY_ARGUMENTS: dict[str, tuple[str, str, str, str | None]] = {
    "as_strided": ("self", "size", "stride", "storage_offset"),
    "as_strided_": ("self", "size", "stride", "storage_offset"),
    "as_strided_copy": ("self", "size", "stride", "storage_offset"),
    "as_strided_scatter": ("self", "size", "stride", "storage_offset"),
    "_reshape_alias": ("self", "size", "stride", None),
    "_reshape_alias_copy": ("self", "size", "stride", None),
    "set_": ("source", "size", "stride", "storage_offset"),
}

#: What allows every op when the rules are off (``--unsafe-no-op-rules``: tests of the process
#: boundary only, see op_policy.enforce_rules).
UNCHECKED = Rule("unchecked", True, "op rules turned off (--unsafe-no-op-rules: tests only)", lambda f: True)

RULES: tuple[Rule, ...] = (
    Rule("namespace", False, "only aten ops run on the daemon", lambda f: f.namespace != "aten"),
    Rule("unexpressible", False, "takes or returns storages, streams, generators or opaque objects",
         lambda f: any(t not in SAFE_ARGUMENT_TYPES for _, t, _ in f.arguments)
         or any(t not in SAFE_RETURN_TYPES for t in f.return_types)),
    Rule("host_io", False, "reads files on the daemon's host",
         lambda f: any(n in ("filename", "file", "path") and "str" in t for n, t, _ in f.arguments)),
    Rule("unchecked", False, "its name says the kernel skips its checks (unsafe, internal helper)",
         lambda f: ("unsafe" in f.op and f.op not in UNSAFE_FOR_AUTOGRAD_ONLY) or f.op.endswith("_helper")),
    Rule("device_assert", False, "a failed device-side assert poisons the CUDA context of every tenant",
         lambda f: "assert" in f.op),
    Rule("test_hook", False, "torch's test scaffolding", lambda f: f.op.startswith("_test_")),
    Rule("non_strided", False, "sparse, mkldnn, quantized, nested or wrapper tensors: constructors "
         "that do not validate their indices, results without a storage",
         lambda f: any(p.search(f.op) for p in NON_STRIDED_FAMILIES.values())),
    Rule("host_check", True, "raises on the host when its argument is bad, changes nothing",
         lambda f: bool(HOST_CHECK_OPS.search(f.op))),
    Rule("sparse_unaudited", False, "a sparse kernel that reads client-chosen index tensors before a sparse "
         "tensor exists to validate, leaves indices unwritten, or combines a gradient with a forward's "
         "structure unchecked", lambda f: bool(SPARSE_FAMILY.search(f.op)) and bool(SPARSE_UNAUDITED.search(f.op))),
    Rule("process_state", False, "reaches process-wide state shared by every tenant",
         lambda f: (not f.takes_tensor and not f.returns_tensor) or bool(PROCESS_STATE_OPS.search(f.op))),
    Rule("trusts_saved_indices", False, "a backward kernel that indexes with its forward's bookkeeping "
         "tensors without checking them (a forged one crashes the daemon)",
         lambda f: bool(TRUSTS_SAVED_INDICES.search(f.op))),
    Rule("sparse", True, "sparse tensors: every sparse result is checked with torch's invariant checks "
         "before it is stored, every sparse tensor an op writes after it, and no strided tensor shares the "
         "storage of a sparse tensor's indices, so sparse kernels only meet valid indices",
         lambda f: bool(SPARSE_FAMILY.search(f.op))),
    Rule("index_checked", True, "an index tensor the kernel trusts: checked to lie inside the tensor it "
         "indexes before the kernel runs", lambda f: f.op in INDEX_BOUNDS),
    Rule("bags_checked", True, "embedding bag: its indices and offsets, and in backward the forward's "
         "bookkeeping tensors (offset2bag, bag_size, maximum_indices), are checked against the weight and "
         "the gradient before the kernel runs", lambda f: f.op in EMBEDDING_BAG_BACKWARD | EMBEDDING_BAG_FORWARD),
    Rule("shape_checked", True, "a backward kernel that trusts its saved tensors' shapes: checked to agree "
         "with the gradient's before the kernel runs", lambda f: f.op in SAME_SHAPE),
    Rule("channel_checked", True, "batch norm: its per-channel tensors are checked to hold one element "
         "per channel of the input before the kernel runs", lambda f: bool(CHANNEL_CHECKED_OPS.search(f.op))),
    Rule("geometry_checked", True, "explicit sizes and strides over an input's storage: checked to lie "
         "inside that storage before the kernel runs",
         lambda f: _geometry_over_input(f) and f.op in GEOMETRY_ARGUMENTS),
    Rule("unvalidated_geometry", False, "explicit sizes and strides over an input's storage, unchecked",
         lambda f: _geometry_over_input(f) and f.op not in GEOMETRY_ARGUMENTS),
    Rule("no_effect", False, "returns nothing and writes no tensor: its only effects are outside tensors",
         lambda f: not f.return_types and not f.writes_self_or_out and not f.writes_other
         and not HOST_CHECK_OPS.search(f.op)),
    Rule("factory", True, "a fresh storage sized from its own arguments",
         lambda f: f.returns_tensor and (not f.takes_tensor or f.op.startswith("new_"))),
    Rule("view", True, "view kernels derive strides from the input's geometry and check dims and ranges",
         lambda f: f.returns_alias),
    Rule("pointwise", True, "TensorIterator broadcasts and checks shapes and dtypes", lambda f: "pointwise" in f.tags),
    Rule("reduction", True, "reduction dims are wrapped and checked against the input", lambda f: "reduction" in f.tags),
    Rule("query", True, "reads tensors, returns plain values, writes nothing",
         lambda f: f.takes_tensor and not f.returns_tensor and not f.writes_self_or_out and not f.writes_other),
    Rule("in_place_or_out", True, "checks self's shape, or resizes its out= tensors, before writing",
         lambda f: f.takes_tensor and f.writes_self_or_out),
    Rule("dense_kernel", True, "strided tensors in, fresh tensors out: ATen's dense kernels check the "
         "shapes and index ranges of their arguments",
         lambda f: f.takes_tensor and f.returns_tensor and not f.returns_alias),
)

#: What decides when no rule above matches.
NO_RULE = Rule("no_rule", False, "no rule says its kernel checks its inputs", lambda f: True)


def classify(overload: torch._ops.OpOverload) -> tuple[Facts, Rule]:
    """The overload's facts and the first rule of :data:`RULES` that matches them."""
    facts = Facts.of(overload)
    for rule in RULES:
        if rule.applies(facts):
            return facts, rule
    return facts, NO_RULE


# ----------------------------------------------------------------------------------------------
# Per-call argument checks
# ----------------------------------------------------------------------------------------------
class ArgumentRefused(ValueError):
    """An argument of an allowed op is one the daemon will not hand its kernel."""


#: A check of one argument's value: the reason it is refused, or None.
ValueCheck = Callable[[Any, Sequence[torch.device]], "str | None"]


def _enum_check(type_name: str) -> ValueCheck:
    expected = ENUM_TYPES[type_name]

    def check(value: Any, devices: Sequence[torch.device]) -> str | None:
        if value is None:
            return None
        if type(value) is not expected:
            return f"must be a {type_name} (the wire's {expected.__name__}), not {type(value).__name__} {value!r:.30}"
        if value in QUANTIZED_DTYPES:
            return f"quantized dtype {value} is not supported"
        if expected is torch.layout and value is not torch.strided and value not in SPARSE_LAYOUTS:
            return f"layout {value} is not supported (strided and sparse tensors only)"
        return None

    return check


def _device_check(value: Any, devices: Sequence[torch.device]) -> str | None:
    if value is None or (type(value) is torch.device and value in devices):
        return None
    return (f"{value!r:.40} is not one of this session's devices ({', '.join(map(str, devices))}); "
            "devices travel as device references (EXT_DEVICE)")


def _must_be_none(value: Any, devices: Sequence[torch.device]) -> str | None:
    return None if value is None else "varlen attention offsets are not supported (dense attention passes none)"


def out_outside_storage(value: Any, devices: Sequence[torch.device]) -> str | None:
    """Why an ``out=`` tensor (or one of a list) is refused: its storage does not hold its
    ``numel`` elements from its data pointer, which only a view that overlaps itself (an
    expanded one) can fail (a view's elements sit at distinct offsets from its own). Kernels that
    are no TensorIterator write their outputs as ``numel`` consecutive elements:
    ``replication_pad2d_backward.grad_input`` into an expanded ``grad_input`` corrupted the heap
    (found by scripts/fuzz_ops.py)."""
    for tensor in value if isinstance(value, (list, tuple)) else (value,):
        if isinstance(tensor, torch.Tensor) and tensor.layout is torch.strided and tensor.numel() > 1:
            needed = (tensor.storage_offset() + tensor.numel()) * tensor.element_size()
            if needed > tensor.untyped_storage().nbytes():
                return (f"overlaps itself (sizes {list(tensor.shape)}, strides {list(tensor.stride())}): an out= "
                        f"tensor must not, its {tensor.numel()} elements need {needed} bytes of storage from its "
                        f"offset, it has {tensor.untyped_storage().nbytes()}")
    return None


def _value_check(name: str, type_name: str) -> ValueCheck | None:
    base = type_name.removeprefix("Optional[").removesuffix("]")
    if base in ENUM_TYPES:
        return _enum_check(base)
    if base == "Device":
        return _device_check
    if name in UNCHECKED_OFFSET_ARGUMENTS:
        return _must_be_none
    return None


def view_outside_storage(tensor: Any, size: Any, stride: Any, offset: Any) -> str | None:
    """Why the view ``(size, stride, offset)`` over ``tensor``'s storage is refused (it reaches
    outside the storage, or is malformed), or None when it lies inside. ``offset`` None means
    ``tensor``'s own storage offset. Not a tensor: the kernel itself will refuse it."""
    if not isinstance(tensor, torch.Tensor):
        return None
    if offset is None:
        offset = tensor.storage_offset()
    if not (isinstance(size, list) and isinstance(stride, list) and len(size) == len(stride)
            and all(type(v) is int and v >= 0 for v in (*size, *stride, offset))):
        return f"sizes {size!r:.60}, strides {stride!r:.60} and offset {offset!r:.20} must be non-negative integers, one stride per size"
    itemsize = tensor.element_size()
    available = tensor.untyped_storage().nbytes()
    if any(n == 0 for n in size):
        needed = offset * itemsize
    else:
        needed = (offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1) * itemsize
    if needed > available:
        return (f"a view of sizes {size}, strides {stride} at offset {offset} needs {needed} bytes of storage; "
                f"the tensor's storage holds {available}")
    return None


def index_outside(index: Any, indexed: Any, dims: int) -> str | None:
    """Why ``index`` does not address the trailing ``dims`` dims of ``indexed`` (a value outside
    ``[0, their element count)``), or None. Not tensors: the kernel itself refuses them."""
    if not isinstance(index, torch.Tensor) or not isinstance(indexed, (torch.Tensor, int)) or index.numel() == 0:
        return None
    if index.is_floating_point() or index.is_complex() or index.dtype is torch.bool:
        return f"must be an integer tensor, not {index.dtype}"
    limit = index_limit(indexed, dims)
    low, high = (int(v) for v in torch.aminmax(index.reshape(-1)))
    if low < 0 or high >= limit:
        return f"holds values in [{low}, {high}]; the tensor it indexes has {limit} elements there"
    return None


def index_limit(indexed: torch.Tensor | int, dims: int) -> int:
    """How many elements an index may address: ``indexed`` itself when it is a count, else the
    element count of its trailing ``dims`` dims."""
    if isinstance(indexed, int):
        return indexed
    limit = 1
    for size in indexed.shape[-dims:] if indexed.dim() >= dims else indexed.shape:
        limit *= size
    return limit


def shape_mismatch(tensors: dict[str, Any]) -> str | None:
    """Why these tensors (None ones aside) do not all have one shape, or None."""
    shapes = {name: list(t.shape) for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len({tuple(shape) for shape in shapes.values()}) > 1:
        return "arguments must have one shape: " + ", ".join(f"{n} {shape}" for n, shape in shapes.items())
    return None


def norm_statistics_mismatch(input: Any, normalized_shape: Any, statistics: dict[str, Any],
                             affine: dict[str, Any]) -> str | None:
    """Why a normalisation backward's saved statistics (one per row) or affine tensors (one per
    normalised element) do not fit ``input``, or None."""
    if not isinstance(input, torch.Tensor) or not isinstance(normalized_shape, list):
        return None
    if not normalized_shape or list(input.shape[-len(normalized_shape):]) != normalized_shape:
        return f"normalized_shape {normalized_shape} must be the last dims of the input's shape {list(input.shape)}"
    per_row = 1
    for size in normalized_shape:
        per_row *= size
    rows = input.numel() // per_row if per_row else 0
    for name, tensor in statistics.items():
        if isinstance(tensor, torch.Tensor) and tensor.numel() != rows:
            return f"argument {name!r} holds {tensor.numel()} elements; the input has {rows} rows"
    for name, tensor in affine.items():
        if isinstance(tensor, torch.Tensor) and tensor.numel() != per_row:
            return f"argument {name!r} holds {tensor.numel()} elements; normalized_shape has {per_row}"
    return None


def channel_mismatch(input: Any, per_channel: dict[str, Any]) -> str | None:
    """Why batch norm's per-channel tensors do not fit ``input``'s channels, or None."""
    if not isinstance(input, torch.Tensor):
        return None
    if input.dim() < 2:
        return f"input must have a channel dimension (at least 2 dims), not {input.dim()}"
    channels = input.shape[1]
    for argument, tensor in per_channel.items():
        if isinstance(tensor, torch.Tensor) and (tensor.dim() != 1 or tensor.shape[0] != channels):
            return (f"argument {argument!r} has shape {list(tensor.shape)}; the input has {channels} channels, "
                    f"so it must be [{channels}]")
    return None


def _malformed_index_tensor(name: str, tensor: Any, dims: int = 1) -> str | None:
    """Why ``tensor`` is no contiguous int32/int64 tensor of ``dims`` dims (embedding bag's kernels
    read their index and bookkeeping tensors as flat arrays), or None."""
    if not isinstance(tensor, torch.Tensor):
        return f"argument {name!r} must be a tensor, not {type(tensor).__name__}"
    if tensor.dtype not in INDEX_DTYPES:
        return f"argument {name!r} must be an int32 or int64 tensor, not {tensor.dtype}"
    if tensor.dim() != dims:
        return f"argument {name!r} must have {dims} dim{'s' if dims > 1 else ''}, not shape {list(tensor.shape)}"
    if not tensor.is_contiguous():
        return f"argument {name!r} must be contiguous (the kernel reads it as a flat array)"
    return None


def _values_outside(name: str, tensor: torch.Tensor, low: int, high: int, what: str) -> str | None:
    """Why ``tensor`` holds a value outside ``[low, high)`` (``what`` says what bounds it), or None.
    On a GPU this reads the min and max back: one sync, paid only by the ops that need it."""
    if tensor.numel() == 0:
        return None
    smallest, largest = (int(v) for v in torch.aminmax(tensor.reshape(-1)))
    if smallest < low or largest >= high:
        return f"argument {name!r} holds values in [{smallest}, {largest}]; they must lie in [{low}, {high}) ({what})"
    return None


def _offsets_mismatch(offsets: Any, index_count: int, rows: int) -> str | None:
    """Why ``offsets`` cannot rebuild ``offset2bag`` for ``index_count`` indices and ``rows`` bags
    of gradient, or None. The kernel adds a one at each offset (index_add_, in bounds only for
    offsets in [0, index_count]) and takes the cumulative sum minus one: index ``i``'s bag is the
    number of offsets <= i, less one. That lies in [0, rows) for every index only if the first
    offset is 0, the offsets never decrease and at most ``rows`` of them start a bag before the
    end of ``indices``."""
    reason = _malformed_index_tensor("offsets", offsets)
    if reason is not None:
        return reason
    if offsets.numel() == 0:
        return "argument 'offsets' is empty, but the kernel rebuilds the empty 'offset2bag' from it"
    reason = _values_outside("offsets", offsets, 0, index_count + 1, f"{index_count} indices")
    if reason is not None:
        return reason
    if int(offsets[0]) != 0:
        return f"argument 'offsets' must start at 0, not {int(offsets[0])}"
    if offsets.numel() > 1 and bool((offsets[1:] < offsets[:-1]).any()):
        return "argument 'offsets' must never decrease"
    bags = int((offsets < index_count).sum())
    if bags > rows:
        return f"argument 'offsets' starts {bags} bags; grad has {rows} rows, one per bag"
    return None


def _offset2bag_mismatch(offset2bag: Any, indices: torch.Tensor, offsets: Any, rows: int, rebuilds: bool) -> str | None:
    """Why ``offset2bag`` (each index's bag: a row of ``grad``) does not fit, or None. Empty with
    indices present, the kernel rebuilds it from ``offsets`` where it can (``rebuilds``)."""
    reason = _malformed_index_tensor("offset2bag", offset2bag)
    if reason is not None:
        return reason
    if offset2bag.numel() == 0 and indices.numel() > 0:
        if not rebuilds:
            return f"argument 'offset2bag' is empty; it must hold one bag per index ({indices.numel()})"
        return _offsets_mismatch(offsets, indices.numel(), rows)
    if offset2bag.numel() != indices.numel():
        return f"argument 'offset2bag' holds {offset2bag.numel()} elements; it must hold one bag per index ({indices.numel()})"
    return _values_outside("offset2bag", offset2bag, 0, rows, f"grad has {rows} rows, one per bag")


def _per_sample_weights_mismatch(per_sample_weights: Any, like: torch.Tensor, indices: torch.Tensor, mode: Any) -> str | None:
    """Why ``per_sample_weights`` (one weight per index, read at every index, of the dtype of
    ``like``: the weight, or its gradient) does not fit, or None."""
    if per_sample_weights is None:
        return None
    if not isinstance(per_sample_weights, torch.Tensor):
        return f"argument 'per_sample_weights' must be a tensor, not {type(per_sample_weights).__name__}"
    if mode != EMBEDDING_BAG_SUM:
        return "argument 'per_sample_weights' is supported only with mode sum (0)"
    if list(per_sample_weights.shape) != [indices.numel()] or per_sample_weights.dtype != like.dtype:
        return (f"argument 'per_sample_weights' has shape {list(per_sample_weights.shape)} and dtype "
                f"{per_sample_weights.dtype}; it must be [{indices.numel()}] (one per index), {like.dtype} like the weight")
    return None


def _maximum_indices_mismatch(maximum_indices: Any, grad: torch.Tensor, num_weights: int) -> str | None:
    """Why mode max's ``maximum_indices`` (each bag's and feature's chosen word; -1 where a bag is
    empty, which the kernel skips) does not fit ``grad`` and ``num_weights``, or None."""
    reason = _malformed_index_tensor("maximum_indices", maximum_indices, dims=2)
    if reason is not None:
        return reason
    if maximum_indices.shape != grad.shape:
        return (f"argument 'maximum_indices' has shape {list(maximum_indices.shape)}; in mode max it must "
                f"have grad's shape {list(grad.shape)} (a word per bag and feature)")
    return _values_outside("maximum_indices", maximum_indices, -1, num_weights,
                           f"num_weights {num_weights}, or -1 for an empty bag")


def _malformed_bag_gradient(grad: Any, mode: Any) -> str | None:
    """Why ``grad`` (one row per bag) or ``mode`` is not one embedding bag's backward takes, or None."""
    if not isinstance(grad, torch.Tensor) or grad.dim() != 2 or not grad.is_floating_point():
        shape = list(grad.shape) if isinstance(grad, torch.Tensor) else type(grad).__name__
        return f"argument 'grad' must be a 2-dim floating-point tensor (a row per bag), not {shape}"
    return _malformed_mode(mode)


def _malformed_mode(mode: Any) -> str | None:
    """Why ``mode`` is not embedding bag's sum, mean or max, or None."""
    if type(mode) is not int or mode not in (EMBEDDING_BAG_SUM, EMBEDDING_BAG_MEAN, EMBEDDING_BAG_MAX):
        return f"argument 'mode' must be 0 (sum), 1 (mean) or 2 (max), not {mode!r:.20}"
    return None


def embedding_bag_forward_mismatch(weight: Any, indices: Any, offsets: Any, mode: Any, per_sample_weights: Any) -> str | None:
    """Why an embedding bag forward's ``indices`` (words: rows of ``weight``), ``offsets`` (where
    each bag starts in ``indices``: never decreasing, inside ``indices``) or
    ``per_sample_weights`` (one per index) do not fit, or None. (CPU checks the indices itself;
    the CUDA kernel does not.)"""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = list(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        return f"argument 'weight' must be a 2-dim embedding table, not {shape}"
    reason = (_malformed_mode(mode)
              or _malformed_index_tensor("indices", indices)
              or _values_outside("indices", indices, 0, weight.shape[0], f"weight has {weight.shape[0]} rows")
              or _malformed_index_tensor("offsets", offsets)
              or _values_outside("offsets", offsets, 0, indices.numel() + 1, f"{indices.numel()} indices"))
    if reason is not None:
        return reason
    if offsets.numel() > 1 and bool((offsets[1:] < offsets[:-1]).any()):
        return "argument 'offsets' must never decrease"
    return _per_sample_weights_mismatch(per_sample_weights, weight, indices, mode)


def embedding_bag_backward_mismatch(grad: Any, indices: Any, offsets: Any, offset2bag: Any, bag_size: Any,
                                    maximum_indices: Any, num_weights: Any, mode: Any,
                                    per_sample_weights: Any, sparse: Any = False) -> str | None:
    """Why ``_embedding_bag_backward``'s or ``_embedding_bag_dense_backward``'s arguments are not
    what an embedding bag forward could have made for ``grad``, or None. ``offsets`` None (the
    dense kernel has none): ``offset2bag`` must be given in full."""
    reason = _malformed_bag_gradient(grad, mode)
    if reason is not None:
        return reason
    if sparse:
        return "sparse gradients (sparse=True) are not supported: use a dense embedding bag"
    if type(num_weights) is not int or num_weights < 0:
        return f"argument 'num_weights' must be a non-negative integer, not {num_weights!r:.20}"
    rows = grad.shape[0]
    reason = (_malformed_index_tensor("indices", indices)
              or _values_outside("indices", indices, 0, num_weights, f"num_weights {num_weights}")
              or _offset2bag_mismatch(offset2bag, indices, offsets, rows, rebuilds=offsets is not None)
              or _malformed_index_tensor("bag_size", bag_size))
    if reason is not None:
        return reason
    if bag_size.numel() < rows:
        return f"argument 'bag_size' holds {bag_size.numel()} elements; grad has {rows} bags"
    if mode == EMBEDDING_BAG_MAX:
        return _maximum_indices_mismatch(maximum_indices, grad, num_weights)
    return _per_sample_weights_mismatch(per_sample_weights, grad, indices, mode)


def per_sample_weights_backward_mismatch(grad: Any, weight: Any, indices: Any, offsets: Any, offset2bag: Any,
                                         mode: Any) -> str | None:
    """Why ``_embedding_bag_per_sample_weights_backward``'s arguments do not fit, or None: it
    multiplies, for each index, ``grad``'s row of its bag with ``weight``'s row of its word. Only
    the CPU kernel rebuilds an empty ``offset2bag`` from ``offsets``; the CUDA one reads it."""
    reason = _malformed_bag_gradient(grad, mode)
    if reason is not None:
        return reason
    if mode != EMBEDDING_BAG_SUM:
        return "per_sample_weights are supported only with mode sum (0)"
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != grad.shape[1]:
        shape = list(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        return f"argument 'weight' must be the 2-dim embedding table with grad's {grad.shape[1]} features, not {shape}"
    return (_malformed_index_tensor("indices", indices)
            or _values_outside("indices", indices, 0, weight.shape[0], f"weight has {weight.shape[0]} rows")
            or _offset2bag_mismatch(offset2bag, indices, offsets, grad.shape[0], rebuilds=indices.device.type == "cpu"))


def contiguous_strides(size: list[Any]) -> list[Any]:
    """The strides of a contiguous tensor of ``size`` (what ``set_`` uses for ``stride=[]``)."""
    strides, step = [], 1
    for n in reversed(size):
        strides.append(step)
        step *= n if type(n) is int and n > 1 else 1
    return strides[::-1]


#: Reads one argument's value from a call's ``(args, kwargs)``.
Reader = Callable[[list[Any], dict[str, Any]], Any]
#: A check of a call's tensors for one of the checking rules: the reason it is refused, or None.
TensorCheck = Callable[[list[Any], dict[str, Any]], "str | None"]


def _readers(schema: Any) -> dict[str, Reader]:
    """A reader per argument: positional by position (or by name, as torch also accepts)."""
    def reader(position: int, argument: str) -> Reader:
        return lambda args, kwargs: args[position] if position < len(args) else kwargs.get(argument)

    return {a.name: reader(i, a.name) for i, a in enumerate(schema.arguments)}


def _geometry_check(schema: Any, read: dict[str, Reader]) -> TensorCheck:
    tensor_name, size_name, stride_name, offset_name = GEOMETRY_ARGUMENTS[schema.name[6:]]
    tensor, size, stride = read[tensor_name], read[size_name], read[stride_name]
    offset = None if offset_name is None else read[offset_name]
    # set_'s ``stride=[]`` means contiguous (and the client drops arguments equal to defaults).
    stride_may_default = [a for a in schema.arguments if a.name == "stride"][0].has_default_value()

    def check(args: list[Any], kwargs: dict[str, Any]) -> str | None:
        strides, sizes = stride(args, kwargs), size(args, kwargs)
        if stride_may_default and strides in (None, []) and isinstance(sizes, list):
            strides = contiguous_strides(sizes)
        return view_outside_storage(tensor(args, kwargs), sizes, strides, offset and offset(args, kwargs))

    return check


def _index_check(schema: Any, read: dict[str, Reader]) -> TensorCheck:
    index, indexed, dims = INDEX_BOUNDS[schema.name[6:]]
    position = [a.name for a in schema.arguments].index(index)

    def check(args: list[Any], kwargs: dict[str, Any]) -> str | None:
        value = read[index](args, kwargs)
        if isinstance(value, torch.Tensor) and value.is_cuda and torch.cuda.is_current_stream_capturing():
            # Inside a CUDA-graph capture nothing can be read back, and a replay runs on new
            # values anyway: the kernel gets the index clamped into range on the device (a
            # no-op for any honest index), recorded into the graph with it.
            clamped = value.clamp(0, max(index_limit(read[indexed](args, kwargs), dims) - 1, 0))
            if position < len(args):
                args[position] = clamped
            else:
                kwargs[index] = clamped
            return None
        reason = index_outside(value, read[indexed](args, kwargs), dims)
        return None if reason is None else f"argument {index!r} {reason}"

    return check


def _channel_check(schema: Any, read: dict[str, Reader]) -> TensorCheck:
    # (Not out= tensors of the same names: the kernel resizes those.)
    per_channel = [a.name for a in schema.arguments if a.name in CHANNEL_ARGUMENTS and not a.kwarg_only]
    return lambda args, kwargs: channel_mismatch(read["input"](args, kwargs),
                                                 {n: read[n](args, kwargs) for n in per_channel})


def _shape_check(schema: Any, read: dict[str, Reader]) -> TensorCheck:
    op = schema.name[6:]
    statistics, affine = NORM_STATISTICS.get(op, ((), ()))

    def check(args: list[Any], kwargs: dict[str, Any]) -> str | None:
        reason = shape_mismatch({n: read[n](args, kwargs) for n in SAME_SHAPE[op]})
        if reason is None and op in NORM_STATISTICS:
            reason = norm_statistics_mismatch(read["input"](args, kwargs), read["normalized_shape"](args, kwargs),
                                              {n: read[n](args, kwargs) for n in statistics},
                                              {n: read[n](args, kwargs) for n in affine})
        return reason

    return check


def _embedding_bag_check(schema: Any, read: dict[str, Reader]) -> TensorCheck:
    """The check of one embedding-bag overload: each reads the arguments it has (the dense
    backward has no ``offsets`` and no ``sparse``; the per-sample one its own few). ``mode`` may
    be left out of a forward call (the client drops arguments equal to their defaults)."""
    names = {a.name for a in schema.arguments}

    def value(name: str, args: list[Any], kwargs: dict[str, Any], default: Any = None) -> Any:
        given = read[name](args, kwargs) if name in names else None
        return default if given is None else given

    if schema.name[6:] in EMBEDDING_BAG_FORWARD:
        return lambda args, kwargs: embedding_bag_forward_mismatch(
            **{n: value(n, args, kwargs) for n in ("weight", "indices", "offsets")},
            mode=value("mode", args, kwargs, EMBEDDING_BAG_SUM), per_sample_weights=value("per_sample_weights", args, kwargs))
    if schema.name == "aten::_embedding_bag_per_sample_weights_backward":
        return lambda args, kwargs: per_sample_weights_backward_mismatch(
            *(value(n, args, kwargs) for n in ("grad", "weight", "indices", "offsets", "offset2bag", "mode")))
    return lambda args, kwargs: embedding_bag_backward_mismatch(
        **{n: value(n, args, kwargs) for n in ("grad", "indices", "offsets", "offset2bag", "bag_size", "maximum_indices",
                                               "num_weights", "mode", "per_sample_weights")},
        sparse=value("sparse", args, kwargs, False))


def _call_check(check: call_checks.CallCheck, schema: Any, read: dict[str, Reader]) -> TensorCheck:
    """The overload's check from call_checks (``check``, :func:`call_checks.check_for`'s), given
    its arguments by name."""
    names = [a.name for a in schema.arguments]
    return lambda args, kwargs: call_checks.run_check(check, {n: read[n](args, kwargs) for n in names})


#: The checking rules' per-call checks, built once per overload.
_TENSOR_CHECKS: dict[str, Callable[[Any, dict[str, Reader]], TensorCheck]] = {
    "geometry_checked": _geometry_check,
    "index_checked": _index_check,
    "channel_checked": _channel_check,
    "shape_checked": _shape_check,
    "bags_checked": _embedding_bag_check,
}


def argument_checker(overload: torch._ops.OpOverload,
                     rule: Rule) -> Callable[[list[Any], dict[str, Any], Sequence[torch.device]], None] | None:
    """The per-call check of an allowed overload's arguments (raising :class:`ArgumentRefused`),
    or None when its arguments need none: each enum, device and varlen-offset argument's value,
    then the check of the rule that allowed it (geometry, index ranges, channels, shapes,
    embedding bags), then the op's own from call_checks (:func:`call_checks.check_for`) whichever
    rule allowed it (``_ctc_loss_backward``'s targets are ``index_checked``, the rest of its
    arguments call-checked)."""
    schema = overload._schema
    read = _readers(schema)
    value_checks = [(read[a.name], a.name, check) for a in schema.arguments
                    if (check := _value_check(a.name, str(a.real_type))) is not None]
    value_checks += [(read[a.name], a.name, out_outside_storage) for a in schema.arguments
                     if a.kwarg_only and a.alias_info is not None and a.alias_info.is_write]
    build = _TENSOR_CHECKS.get(rule.name)
    tensor_checks = [build(schema, read)] if build is not None else []
    call_check = call_checks.check_for(schema)
    if call_check is not None:
        tensor_checks.append(_call_check(call_check, schema, read))
    if not value_checks and not tensor_checks:
        return None
    name = f"{schema.name}.{schema.overload_name}" if schema.overload_name else schema.name

    def check_arguments(args: list[Any], kwargs: dict[str, Any], devices: Sequence[torch.device]) -> None:
        for reader, argument, check in value_checks:
            # By position and by name: a raw client may name a positional argument.
            for candidate in (reader(args, kwargs), kwargs.get(argument)):
                reason = check(candidate, devices)
                if reason is not None:
                    raise ArgumentRefused(f"{name}: argument {argument!r} {reason}")
        for tensor_check in tensor_checks:
            reason = tensor_check(args, kwargs)
            if reason is not None:
                raise ArgumentRefused(f"{name}: {reason}")

    return check_arguments
