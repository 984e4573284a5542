"""The op allowlist, checked over torch's whole schema registry (no daemon needed).

Every aten overload the daemon's torch knows is put through the policy (server/op_rules.py,
server/op_policy.py), and for each one it allows, the test asserts what the rule that allowed it
promises: no storage or stream arguments, no non-strided family, explicit view geometry only with
a bounds check, every enum and device argument checked per call (a raw integer or a device string
there is refused), ``unsafe`` flags forced off. Then the families the daemon must refuse are
refused, with the findings of issue 15 among them. A new torch that adds overloads is covered
without editing this file.
"""

from __future__ import annotations

import pytest
import torch

from libremote_server.worker import op_policy, op_rules, values

DEVICES = [torch.device("cpu")]


def _has_schema(name: str) -> bool:
    op, _, overload = name.partition(".")
    try:
        torch._C._dispatch_find_schema_or_throw(op, overload)
    except RuntimeError:
        return False
    return True


#: Every aten overload registered with the dispatcher. A few are registered from Python without
#: a schema the dispatcher can find (``einsum.sublist``): those never resolve (tested below).
REGISTERED = sorted(name for name in torch._C._dispatch_get_all_op_names() if name.startswith("aten::"))
ALL_ATEN = [name for name in REGISTERED if _has_schema(name)]


def _overload(name: str) -> torch._ops.OpOverload:
    op, _, overload = name.removeprefix("aten::").partition(".")
    return getattr(getattr(torch.ops.aten, op), overload or "default")


def _classified() -> list[tuple[str, op_rules.Facts, op_rules.Rule]]:
    return [(name, *op_rules.classify(_overload(name))) for name in ALL_ATEN]


CLASSIFIED = _classified()
ALLOWED = [(name, facts, rule) for name, facts, rule in CLASSIFIED if rule.allows]


def _base_type(type_name: str) -> str:
    return type_name.removeprefix("Optional[").removesuffix("]")


def _refuses(entry: op_policy.OpEntry, position: int, argument: str, kwarg_only: bool, value: object) -> bool:
    """Whether the entry's per-call check refuses ``value`` in ``argument`` (every other argument
    None, which no check refuses)."""
    schema = entry.overload._schema
    args: list[object] = [None] * len([a for a in schema.arguments if not a.kwarg_only])
    kwargs: dict[str, object] = {}
    if kwarg_only:
        kwargs[argument] = value
    else:
        args[position] = value
    try:
        entry.check_arguments(args, kwargs, DEVICES)
    except op_policy.ArgumentRefused:
        return True
    return False


def test_the_registry_is_classified_and_the_allowlist_is_not_empty():
    assert len(CLASSIFIED) > 2000
    allowed = {name for name, _, _ in ALLOWED}
    for name in ("aten::add.Tensor", "aten::mm", "aten::as_strided", "aten::empty.memory_format",
                 "aten::_to_copy", "aten::convolution", "aten::_unsafe_view", "aten::_local_scalar_dense",
                 "aten::_foreach_add_.List", "aten::_index_put_impl_", "aten::view", "aten::copy_"):
        assert name in allowed, name


def test_resolve_agrees_with_the_rules_for_every_overload():
    for name, _, rule in CLASSIFIED:
        if rule.allows:
            assert op_policy.resolve(name).rule == rule.name, name
        else:
            with pytest.raises(op_policy.OpRefused, match=rule.name):
                op_policy.resolve(name)
    for name in set(REGISTERED) - set(ALL_ATEN):
        with pytest.raises(op_policy.OpRefused, match="does not exist"):
            op_policy.resolve(name)


def test_an_allowed_op_is_allowed_by_its_own_rule_and_by_no_refusing_one():
    """The rules are ordered refusals first: for an allowed overload, no refusing rule holds."""
    for name, facts, rule in ALLOWED:
        assert rule.applies(facts), name
        refusing = [r.name for r in op_rules.RULES if not r.allows and r.applies(facts)]
        assert not refusing, (name, refusing)


def test_no_allowed_op_takes_storages_streams_generators_or_opaque_objects():
    for name, facts, _ in ALLOWED:
        for argument, type_name, _ in facts.arguments:
            assert type_name in op_rules.SAFE_ARGUMENT_TYPES, (name, argument, type_name)
            assert "Storage" not in type_name and "Stream" not in type_name and "__torch__" not in type_name
            if "Generator" in type_name:
                assert type_name == "Optional[Generator]", name
        for type_name in facts.return_types:
            assert type_name in op_rules.SAFE_RETURN_TYPES, (name, type_name)


def test_no_allowed_op_is_of_a_non_strided_family():
    for name, facts, _ in ALLOWED:
        for family, pattern in op_rules.NON_STRIDED_FAMILIES.items():
            assert not pattern.search(facts.op), (name, family)


def test_sparse_ops_are_allowed_by_the_sparse_rule_and_unaudited_sparse_kernels_are_not():
    """The sparse family runs because the worker keeps every sparse tensor valid (the ``sparse``
    rule), never by a rule for dense kernels; helpers that walk raw index tensors, factories of
    unwritten indices and sparse backward kernels are refused (``sparse_unaudited``)."""
    allowed = {name: rule.name for name, facts, rule in ALLOWED if op_rules.SPARSE_FAMILY.search(facts.op)}
    assert set(allowed.values()) <= {"sparse", "host_check"}, allowed
    for name in ("aten::_sparse_coo_tensor_with_dims_and_tensors", "aten::sparse_compressed_tensor.comp_plain_value_size",
                 "aten::_to_sparse", "aten::_to_sparse_csr", "aten::_to_dense", "aten::_coalesce", "aten::_indices",
                 "aten::crow_indices", "aten::_sparse_addmm", "aten::_coalesced_", "aten::sparse_mask"):
        assert allowed.get(name) == "sparse", name
    for name in ("aten::_validate_sparse_coo_tensor_args", "aten::_validate_sparse_compressed_tensor_args"):
        assert allowed.get(name) == "host_check", name
    for name, facts, rule in CLASSIFIED:
        if op_rules.SPARSE_FAMILY.search(facts.op) and op_rules.SPARSE_UNAUDITED.search(facts.op):
            assert not rule.allows, name


def test_explicit_geometry_over_an_input_is_allowed_only_with_a_bounds_check():
    checked = []
    for name, facts, rule in ALLOWED:
        if facts.explicit_geometry and facts.takes_tensor and not facts.op.startswith("new_"):
            entry = op_policy.resolve(name)
            assert rule.name == "geometry_checked" and entry.check_arguments is not None, name
            checked.append(name)
            schema = entry.overload._schema
            positions = {a.name: i for i, a in enumerate(schema.arguments)}
            owner = op_rules.GEOMETRY_ARGUMENTS[facts.op][0]
            args: list[object] = [torch.zeros(4) if a.name in ("self", "src", "source") else None
                                  for a in schema.arguments if not a.kwarg_only]
            args[positions["size"]], args[positions["stride"]] = [1000], [1]
            with pytest.raises(op_policy.ArgumentRefused, match="storage"):
                entry.check_arguments(args, {}, DEVICES)
            args[positions["size"]] = [2]
            entry.check_arguments(args, {}, DEVICES)  # inside: no refusal
            assert owner in positions
    assert {"aten::as_strided", "aten::_reshape_alias", "aten::set_.source_Tensor_storage_offset"} <= set(checked)


def test_every_enum_argument_refuses_raw_integers_and_every_device_argument_refuses_strings():
    enum_checked = device_checked = 0
    for name, facts, _ in ALLOWED:
        entry = op_policy.resolve(name)
        for position, (argument, type_name, kwarg_only) in enumerate(facts.arguments):
            base = _base_type(type_name)
            if base in op_rules.ENUM_TYPES:
                assert entry.check_arguments is not None, name
                assert _refuses(entry, position, argument, kwarg_only, -1), (name, argument)
                assert _refuses(entry, position, argument, kwarg_only, 3), (name, argument)
                good = {"ScalarType": torch.float32, "Layout": torch.strided,
                        "MemoryFormat": torch.contiguous_format}[base]
                assert not _refuses(entry, position, argument, kwarg_only, good), (name, argument)
                if base == "Layout":
                    assert _refuses(entry, position, argument, kwarg_only, torch._mkldnn), name
                    assert not _refuses(entry, position, argument, kwarg_only, torch.sparse_csr), name
                if base == "ScalarType":
                    assert _refuses(entry, position, argument, kwarg_only, torch.qint8), name
                enum_checked += 1
            elif base == "Device":
                assert entry.check_arguments is not None, name
                for escape in ("cuda:1", "privateuseone", "cpu", "meta", 0, torch.device("meta")):
                    assert _refuses(entry, position, argument, kwarg_only, escape), (name, argument, escape)
                assert not _refuses(entry, position, argument, kwarg_only, torch.device("cpu")), name
                device_checked += 1
            elif argument in op_rules.UNCHECKED_OFFSET_ARGUMENTS:
                assert _refuses(entry, position, argument, kwarg_only, torch.zeros(2, dtype=torch.int32)), name
    assert enum_checked > 200 and device_checked > 70


def test_trusted_index_tensors_are_range_checked():
    checked = set()
    for name, facts, rule in ALLOWED:
        if facts.op not in op_rules.INDEX_BOUNDS:
            continue
        assert rule.name == "index_checked", name
        index, indexed, dims = op_rules.INDEX_BOUNDS[facts.op]
        entry = op_policy.resolve(name)
        positions = [argument for argument, _, _ in facts.arguments]
        args: list[object] = [None] * len([1 for _, _, kwarg_only in facts.arguments if not kwarg_only])
        if dims == 0:  # an integer argument counts what the index addresses
            args[positions.index(indexed)] = inside = 7
        else:
            args[positions.index(indexed)] = torch.zeros(2, 3, 4, 5)
            inside = 5 * (4 if dims >= 2 else 1) * (3 if dims >= 3 else 1)
        for values_, refused in (([0, inside - 1], False), ([inside], True), ([-1], True)):
            args[positions.index(index)] = torch.tensor(values_)
            if refused:
                with pytest.raises(op_policy.ArgumentRefused, match=index):
                    entry.check_arguments(args, {}, DEVICES)
            else:
                entry.check_arguments(args, {}, DEVICES)
        checked.add(facts.op)
    assert checked == set(op_rules.INDEX_BOUNDS)


def test_batch_norms_per_channel_tensors_are_checked():
    checked = 0
    for name, facts, rule in ALLOWED:
        if "batch_norm" not in facts.op:
            continue
        assert rule.name == "channel_checked", name
        per_channel = [a for a, _, kwarg_only in facts.arguments if a in op_rules.CHANNEL_ARGUMENTS and not kwarg_only]
        if not per_channel:
            continue
        entry = op_policy.resolve(name)
        positions = [a for a, _, _ in facts.arguments]
        kwarg_only = {a for a, _, k in facts.arguments if k}
        args: list[object] = [None] * (len(positions) - len(kwarg_only))
        kwargs: dict[str, object] = {}

        def put(argument: str, value: object) -> None:
            if argument in kwarg_only:
                kwargs[argument] = value
            else:
                args[positions.index(argument)] = value

        put("input", torch.zeros(2, 3, 4))
        for argument in per_channel:
            put(argument, torch.zeros(1))
            with pytest.raises(op_policy.ArgumentRefused, match=argument):
                entry.check_arguments(args, kwargs, DEVICES)
            put(argument, torch.zeros(3))
        entry.check_arguments(args, kwargs, DEVICES)
        checked += 1
    assert checked > 20


@pytest.mark.parametrize("name, args, refused", [
    ("aten::_log_softmax_backward_data", [torch.ones(200, 300), torch.ones(2, 3), 1, torch.float32], "one shape"),
    ("aten::_softmax_backward_data", [torch.ones(2, 3), torch.ones(2, 4), 1, torch.float32], "one shape"),
    ("aten::_log_softmax_backward_data", [torch.ones(2, 3), torch.ones(2, 3), 1, torch.float32], None),
    ("aten::native_layer_norm_backward",
     [torch.ones(2, 3), torch.ones(2, 3), [3], torch.ones(1), torch.ones(2), None, None, [True] * 3], "'mean'"),
    ("aten::native_layer_norm_backward",
     [torch.ones(2, 3), torch.ones(2, 3), [3], torch.ones(2, 1), torch.ones(2, 1), torch.ones(2), None, [True] * 3], "'weight'"),
    ("aten::native_layer_norm_backward",
     [torch.ones(2, 3), torch.ones(2, 3), [4], torch.ones(2, 1), torch.ones(2, 1), None, None, [True] * 3], "normalized_shape"),
    ("aten::native_layer_norm_backward",
     [torch.ones(2, 3), torch.ones(2, 3), [3], torch.ones(2, 1), torch.ones(2, 1), torch.ones(3), torch.ones(3), [True] * 3], None),
])
def test_backward_kernels_saved_tensors_must_fit_the_gradient(name, args, refused):
    entry = op_policy.resolve(name)
    if refused is None:
        entry.check_arguments(args, {}, DEVICES)
        entry.overload(*args)  # and the kernel takes them
    else:
        with pytest.raises(op_policy.ArgumentRefused, match=refused):
            entry.check_arguments(args, {}, DEVICES)


def test_backward_kernels_that_index_with_saved_bookkeeping_are_allowed_only_with_its_check():
    """Embedding-bag backward indexes with its forward's offset2bag, bag_size and maximum_indices
    (and the CUDA forward with its indices and offsets): every overload of it is allowed by
    ``bags_checked`` and has a per-call check; the rest of the family that trusts saved indices
    stays refused."""
    embedding_bag = op_rules.EMBEDDING_BAG_BACKWARD | op_rules.EMBEDDING_BAG_FORWARD
    checked = set()
    for name, facts, rule in ALLOWED:
        assert not op_rules.TRUSTS_SAVED_INDICES.search(facts.op), name
        if facts.op in embedding_bag or rule.name == "bags_checked":
            assert rule.name == "bags_checked" and facts.op in embedding_bag, name
            assert op_policy.resolve(name).check_arguments is not None, name
            checked.add(facts.op)
    assert checked == embedding_bag


@pytest.mark.parametrize("name", ["aten::_embedding_bag", "aten::_embedding_bag_forward_only", "aten::embedding_bag"])
def test_embedding_bag_forward_indices_and_offsets_must_lie_inside(name):
    entry = op_policy.resolve(name)
    weight, indices, offsets = torch.randn(10, 4), torch.tensor([1, 2, 9, 0]), torch.tensor([0, 3, 3])
    entry.check_arguments([weight, indices, offsets], {}, DEVICES)
    entry.check_arguments([weight, indices, offsets, False, 0, False, torch.rand(4)], {}, DEVICES)
    for forged, word in ((torch.tensor([1, 2, 10, 0]), "'indices'"), (torch.tensor([1, -1, 9, 0]), "'indices'"),
                         (torch.tensor([[1, 2], [9, 0]]), "'indices'")):
        with pytest.raises(op_policy.ArgumentRefused, match=word):
            entry.check_arguments([weight, forged, offsets], {}, DEVICES)
    for forged in (torch.tensor([0, 3, 5]), torch.tensor([0, 3, 1]), torch.tensor([0, -1]), torch.tensor([0.0])):
        with pytest.raises(op_policy.ArgumentRefused, match="'offsets'"):
            entry.check_arguments([weight, indices, forged], {}, DEVICES)
    with pytest.raises(op_policy.ArgumentRefused, match="'per_sample_weights'"):
        entry.check_arguments([weight, indices, offsets, False, 0, False, torch.rand(3)], {}, DEVICES)


def _embedding_bag_forward(mode: int, weighted: bool) -> dict[str, object]:
    """A real CPU forward's saved tensors for three bags (one empty) over 10 words of 4 features."""
    weight = torch.randn(10, 4)
    indices, offsets = torch.tensor([1, 2, 9, 0, 0, 7]), torch.tensor([0, 3, 3])
    per_sample_weights = torch.rand(6) if weighted else None
    output, offset2bag, bag_size, maximum_indices = torch.ops.aten._embedding_bag(
        weight, indices, offsets, False, mode, False, per_sample_weights)
    return {"grad": torch.randn_like(output), "weight": weight, "indices": indices, "offsets": offsets,
            "offset2bag": offset2bag, "bag_size": bag_size, "maximum_indices": maximum_indices,
            "num_weights": 10, "scale_grad_by_freq": False, "mode": mode, "sparse": False,
            "per_sample_weights": per_sample_weights, "padding_idx": -1}


@pytest.mark.parametrize("mode, weighted", [(0, False), (0, True), (1, False), (2, False)])
@pytest.mark.parametrize("name", ["aten::_embedding_bag_backward", "aten::_embedding_bag_dense_backward",
                                  "aten::_embedding_bag_per_sample_weights_backward"])
def test_embedding_bag_backward_takes_what_its_forward_made_and_refuses_forgeries(name, mode, weighted):
    entry = op_policy.resolve(name)
    schema = entry.overload._schema
    if "per_sample_weights" in name and (mode != 0 or not weighted):
        pytest.skip("per_sample_weights exist in mode sum only")
    saved = _embedding_bag_forward(mode, weighted)
    if name.endswith("dense_backward") and saved["offset2bag"].numel() == 0:  # CPU's fast sum path
        saved["offset2bag"] = torch.tensor([0, 0, 0, 2, 2, 2])

    def arguments(**forged: object) -> list[object]:
        return [{**saved, **forged}[a.name] for a in schema.arguments]

    entry.check_arguments(arguments(), {}, DEVICES)
    entry.overload(*arguments())  # and the kernel takes them
    rows = saved["grad"].shape[0]
    forgeries = {
        "offset2bag": torch.tensor([0, 0, 0, 2, 2, rows]),
        "indices": torch.tensor([1, 2, 9, 0, 0, 10]),  # 10 words (num_weights, or weight's rows)
        "grad": torch.ones(rows, 4, 1),
    }
    if "bag_size" in {a.name for a in schema.arguments}:
        forgeries["bag_size"] = torch.tensor([1])
        if mode == 2:
            forgeries["maximum_indices"] = torch.full((rows, 4), 10)
    for argument, value in forgeries.items():
        with pytest.raises(op_policy.ArgumentRefused, match=f"'{argument}'"):
            entry.check_arguments(arguments(**{argument: value}), {}, DEVICES)


def test_ops_with_no_checked_argument_pay_nothing_per_call():
    """A per-call check exists exactly where something needs checking: the rule's own checks,
    enum, device and offset arguments, a call check of call_checks.py, or an out= tensor (which
    must not overlap itself)."""
    from libremote_server.worker import call_checks

    for name, facts, rule in ALLOWED:
        schema = op_policy.resolve(name).overload._schema
        needs = rule.name in ("geometry_checked", "index_checked", "channel_checked", "shape_checked",
                              "bags_checked") or any(
            _base_type(t) in op_rules.ENUM_TYPES or _base_type(t) == "Device" or n in op_rules.UNCHECKED_OFFSET_ARGUMENTS
            for n, t, _ in facts.arguments) or call_checks.check_for(schema) is not None or any(
            a.kwarg_only and a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
        assert (op_policy.resolve(name).check_arguments is not None) == needs, name


def test_unsafe_flags_are_forced_off():
    for name, facts, _ in ALLOWED:
        if any(argument == "unsafe" for argument, _, _ in facts.arguments):
            entry = op_policy.resolve(name)
            position = [a for a, _, _ in facts.arguments].index("unsafe")
            args = [None] * (position + 1)
            args[position] = True
            kwargs = {"unsafe": True}
            entry.sanitize(args, kwargs)
            assert args[position] is False and "unsafe" not in kwargs, name


def test_no_allowed_op_is_without_tensors_and_without_effect():
    for name, facts, rule in ALLOWED:
        assert facts.takes_tensor or facts.returns_tensor, name
        if not facts.return_types:
            assert facts.writes_self_or_out or facts.writes_other or rule.name == "host_check", name


@pytest.mark.parametrize("name, rule", [
    ("aten::_sparse_coo_tensor_unsafe", "unchecked"),
    ("aten::_sparse_csr_tensor_unsafe", "unchecked"),
    ("aten::_cslt_sparse_mm", "non_strided"),
    ("aten::_to_sparse_semi_structured", "non_strided"),
    ("aten::to_mkldnn", "non_strided"),
    ("aten::_add_batch_dim", "non_strided"),
    ("aten::_efficientzerotensor", "non_strided"),
    ("aten::quantize_per_tensor", "non_strided"),
    ("aten::_nested_view_from_buffer", "non_strided"),
    ("aten::set_.source_Storage_storage_offset", "unexpressible"),
    ("aten::record_stream", "unexpressible"),
    ("aten::from_file", "host_io"),
    ("aten::_unsafe_index.Tensor", "unchecked"),
    ("aten::_cummax_helper", "unchecked"),
    ("aten::_assert_async", "device_assert"),
    ("aten::_cufft_set_plan_cache_max_size", "process_state"),
    ("aten::_cufft_clear_plan_cache", "process_state"),
    ("aten::_cudnn_rnn", "process_state"),
    ("aten::_cudnn_init_dropout_state", "process_state"),
    ("aten::_print", "process_state"),
    ("aten::_test_warn_in_autograd", "test_hook"),
    ("aten::_segment_reduce_backward", "trusts_saved_indices"),
    ("aten::_thnn_differentiable_gru_cell_backward", "trusts_saved_indices"),
    ("aten::_convert_indices_from_csr_to_coo", "sparse_unaudited"),
    ("aten::_spdiags", "sparse_unaudited"),
    ("aten::_sparse_compressed_tensor_with_dims", "sparse_unaudited"),
    ("aten::_sparse_softmax_backward_data", "sparse_unaudited"),
    ("aten::embedding_sparse_backward", "sparse_unaudited"),
])
def test_the_hazardous_families_are_refused(name, rule):
    _, decided = op_rules.classify(_overload(name))
    assert not decided.allows and decided.name == rule, (name, decided.name)
    with pytest.raises(op_policy.OpRefused, match=rule):
        op_policy.resolve(name)


@pytest.mark.parametrize("size, stride, offset, inside", [
    ([4], [1], 0, True),
    ([2, 2], [2, 1], 0, True),
    ([4], [1], 1, False),
    ([5], [1], None, False),
    ([2], [4], 0, False),
    ([0], [1], 4, True),
    ([0], [1], 5, False),
    ([2], [-1], 3, False),
    ([-1], [1], 0, False),
    ([2], [1, 1], 0, False),
    ([1 << 62], [1 << 62], 0, False),
])
def test_a_view_must_lie_inside_its_storage(size, stride, offset, inside):
    tensor = torch.zeros(4)
    assert (op_rules.view_outside_storage(tensor, size, stride, offset) is None) == inside


def test_set_without_strides_is_checked_as_contiguous():
    entry = op_policy.resolve("aten::set_.source_Tensor_storage_offset")
    source = torch.zeros(6)
    entry.check_arguments([torch.zeros(0), source, 2, [2, 2]], {}, DEVICES)
    entry.check_arguments([torch.zeros(0), source, 0, [2, 3], []], {}, DEVICES)
    with pytest.raises(op_policy.ArgumentRefused, match="storage"):
        entry.check_arguments([torch.zeros(0), source, 3, [2, 2]], {}, DEVICES)
    assert op_rules.contiguous_strides([2, 3, 4]) == [12, 4, 1]
    assert op_rules.contiguous_strides([0, 3]) == [3, 1]


@pytest.mark.parametrize("make, why", [
    (lambda: torch.sparse_coo_tensor([[7]], [1.0], (3,), check_invariants=False), "invariant"),
    (lambda: torch.sparse_csr_tensor([0, 2], [0, 9], [1.0, 2.0], (1, 3), check_invariants=False), "invariant"),
    (lambda: torch.zeros(3).to_mkldnn(), "mkldnn"),
    (lambda: torch.quantize_per_tensor(torch.zeros(3), 0.1, 0, torch.qint8), "quantized"),
    (lambda: torch.ops.aten._add_batch_dim(torch.zeros(3), 0, 1), "storage"),
    (lambda: torch.ops.aten._efficientzerotensor([3]), "storage"),
    (lambda: torch.zeros(3, device="meta"), "meta"),
])
def test_only_strided_tensors_with_storage_on_the_sessions_devices_are_stored(make, why):
    assert values.unstorable(torch.zeros(3), DEVICES) is None
    assert values.unstorable(torch.zeros(3)[1:], DEVICES) is None
    assert why in values.unstorable(make(), DEVICES)
