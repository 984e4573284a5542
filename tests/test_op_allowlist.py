"""The op allowlist at the trust boundary: hostile ops from raw clients against a real daemon.

Each test replays a finding of issue 15 ("the daemon as a real trust boundary") with a raw pyzmq
client (:class:`RawClient`), which sends what the libremote client never would: views with
explicit sizes and strides past their storage, sparse constructors with indices outside their size, ops
whose results have no storage, raw integers where a schema wants a dtype, device strings. The
daemon must refuse each with a clear error, store nothing, and keep serving every session. The
rules themselves are tested over the whole schema registry in test_op_rules.py.

The daemon here is this module's own: on code without these checks several of these requests
crash the daemon, and a crash must fail these tests, not the rest of the suite.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from libremote_wire import codec, torch_codec
from libremote_wire.messages import Cmd, Msg

from conftest import Daemon
from raw_client import RawClient

F32 = torch_codec.dtype_ext(torch.float32)
F64 = torch_codec.dtype_ext(torch.float64)
DEVICE = codec.device_ext(0)
_op_ids = itertools.count(1)


def h(handle: int) -> Any:
    return codec.handle_ext(handle)


@pytest.fixture(scope="module")
def _module_daemon() -> Iterator[list[Daemon]]:
    holder = [Daemon()]
    yield holder
    holder[0].stop()


@pytest.fixture
def server(_module_daemon: list[Daemon]) -> Daemon:
    """This module's daemon; a fresh one if a test before crashed it (each test then fails on
    its own finding, not on the one before)."""
    if _module_daemon[0].process.poll() is not None:
        _module_daemon[0].stop()
        _module_daemon[0] = Daemon()
    return _module_daemon[0]


@pytest.fixture
def raw(server: Daemon) -> Iterator[RawClient]:
    with RawClient(server.address) as client:
        assert client.hello()[0] == Msg.WELCOME
        yield client


def op_sync(client: RawClient, name: str, args: list[Any], kwargs: dict[str, Any] | None = None,
            outs: list[Any] | None = None) -> tuple[list[Any], Any]:
    """Run ``name`` once (a fresh op id each time); return (results, error)."""
    results, error, _ = client.call([[Cmd.OP_SYNC, [next(_op_ids), name], args, kwargs or {}, outs or [None]]])
    return results, error


def assert_refused(error: Any, *words: str) -> None:
    assert error is not None, "the op ran"
    kind, _, message = error
    assert kind == "refused", error
    for word in words:
        assert word in message, (word, error)


def assert_never_computed(client: RawClient, handle: int) -> None:
    results, error, frames = client.call([[Cmd.FETCH, handle]])
    assert frames == [] and results == [None], "a refused op's output holds bytes"
    assert error[0] == "handle" and "never computed" in error[2], error


def assert_daemon_serves(server: Daemon) -> None:
    """The daemon is alive and a fresh session computes correctly."""
    assert server.process.poll() is None, f"the daemon died:\n{server.log()[-3000:]}"
    with RawClient(server.address) as other:
        assert other.hello()[0] == Msg.WELCOME
        other.put(1, torch.tensor([1.0, 2.0]))
        _, error = op_sync(other, "aten::mul.Tensor", [h(1), h(1)], outs=[2])
        assert error is None, error
        assert other.fetch(2).tolist() == [1.0, 4.0]


# ------------------------------------------------------------------------------------------------
# Views with explicit sizes and strides
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["aten::_reshape_alias", "aten::_reshape_alias_copy"])
def test_reshape_alias_cannot_read_another_tenants_tensor(server, name):
    secret = torch.full((4096,), 31337.0)
    with RawClient(server.address) as victim, RawClient(server.address) as attacker:
        assert victim.hello()[0] == Msg.WELCOME and attacker.hello()[0] == Msg.WELCOME
        victim.put(1, secret)
        attacker.put(1, torch.zeros(4))
        # A view of the attacker's 16-byte storage that spans a megabyte of the daemon's heap.
        results, error = op_sync(attacker, name, [h(1), [1 << 18], [1]], outs=[2])
        assert_refused(error, "storage")
        assert results == [None]
        assert_never_computed(attacker, 2)
        assert victim.fetch(1).equal(secret)
    assert_daemon_serves(server)


def test_fill_through_an_out_of_bounds_view_is_refused_and_the_daemon_lives(server, raw):
    raw.put(1, torch.zeros(4))
    # Streamed, as a client pipelines them: the view, then a write through it.
    raw.batch([[Cmd.OP, [next(_op_ids), "aten::_reshape_alias"], [h(1), [1 << 26], [1]], {}, [2]],
               [Cmd.OP, [next(_op_ids), "aten::fill_.Scalar"], [h(2), 7.0], {}, [None]]], want_reply=False)
    results, error, _ = raw.call([[Cmd.SYNC]])
    assert_refused(error, "storage")
    assert_never_computed(raw, 2)
    assert raw.fetch(1).tolist() == [0.0] * 4
    assert_daemon_serves(server)


def test_as_strided_views_inside_their_storage_run_and_others_are_refused(raw):
    raw.put(1, torch.arange(6.0))
    _, error = op_sync(raw, "aten::as_strided", [h(1), [2, 2], [2, 1], 1], outs=[2])
    assert error is None, error
    assert raw.fetch(2).equal(torch.arange(6.0).as_strided((2, 2), (2, 1), 1))
    for size, stride, offset in (([7], [1], 0), ([2], [1], 5), ([3], [3], 0), ([2], [-1], 2)):
        _, error = op_sync(raw, "aten::as_strided", [h(1), size, stride, offset], outs=[3])
        assert_refused(error, "storage") if min(stride) >= 0 else assert_refused(error, "non-negative")
        assert_never_computed(raw, 3)
    _, error = op_sync(raw, "aten::as_strided_", [h(1), [100], [1]])
    assert_refused(error, "storage")
    assert raw.fetch(1).equal(torch.arange(6.0))  # its geometry untouched
    # set_ onto another tensor's storage with explicit geometry: inside it, or refused.
    raw.put(4, torch.zeros(0))
    _, error = op_sync(raw, "aten::set_.source_Tensor_storage_offset", [h(4), h(1), 0, [100], [1]])
    assert_refused(error, "storage")
    _, error = op_sync(raw, "aten::set_.source_Tensor_storage_offset", [h(4), h(1), 2, [2, 2]])  # stride=[] dropped
    assert error is None, error
    assert raw.fetch(4).equal(torch.arange(2.0, 6.0).view(2, 2))
    _, error = op_sync(raw, "aten::set_.source_Tensor_storage_offset", [h(4), h(1), 3, [2, 2]])
    assert_refused(error, "storage")


def test_pooling_backward_with_forged_indices_is_refused_and_the_daemon_lives(server, raw):
    raw.put(1, torch.ones(1, 1, 1, 1))  # grad_output
    raw.put(2, torch.ones(1, 1, 2, 2))  # the forward's input
    raw.put(3, torch.tensor([[[[1 << 40]]]]))  # an argmax far outside the 2x2 plane
    raw.put(4, torch.tensor([[[[3]]]]))
    name = "aten::max_pool2d_with_indices_backward"
    _, error = op_sync(raw, name, [h(1), h(2), [2, 2], [2, 2], [0, 0], [1, 1], False, h(3)], outs=[5])
    assert_refused(error, "indices")
    assert_never_computed(raw, 5)
    _, error = op_sync(raw, name, [h(1), h(2), [2, 2], [2, 2], [0, 0], [1, 1], False, h(4)], outs=[6])
    assert error is None, error
    assert raw.fetch(6).flatten().tolist() == [0.0, 0.0, 0.0, 1.0]
    assert_daemon_serves(server)


def test_embedding_backward_with_forged_indices_is_refused_and_the_daemon_lives(server, raw):
    raw.put(1, torch.ones(1, 3))  # grad
    raw.put(2, torch.tensor([1 << 40]))  # an index far outside num_weights
    name = "aten::embedding_dense_backward"
    _, error = op_sync(raw, name, [h(1), h(2), 2, -1, True], outs=[3])
    assert_refused(error, "indices")
    assert_never_computed(raw, 3)
    raw.put(4, torch.tensor([1]))
    _, error = op_sync(raw, name, [h(1), h(4), 2, -1, True], outs=[5])
    assert error is None, error
    assert raw.fetch(5).tolist() == [[0.0] * 3, [1.0] * 3]
    assert_daemon_serves(server)


def _embedding_bag_arguments(**forged: torch.Tensor) -> dict[str, Any]:
    """``_embedding_bag_backward``'s tensors for two bags of 3 features over 4 of 6 words, as a
    mean-mode forward made them, with ``forged`` ones in their place."""
    honest = {
        "grad": torch.ones(2, 3), "indices": torch.tensor([1, 2, 4, 5]), "offsets": torch.tensor([0, 2]),
        "offset2bag": torch.tensor([0, 0, 1, 1]), "bag_size": torch.tensor([2, 2]),
        "maximum_indices": torch.tensor([[1, 2, 1], [4, 5, 5]]),
    }
    return {**honest, **forged}


_EMBEDDING_BAG_TENSORS = ("grad", "indices", "offsets", "offset2bag", "bag_size", "maximum_indices")


def _embedding_bag_backward(raw: RawClient, tensors: dict[str, torch.Tensor], mode: int, first: int) -> tuple[int, Any]:
    """Put ``tensors`` at handles ``first``.. and run ``_embedding_bag_backward`` on them (6 words,
    dense); return (the result's handle, the error)."""
    for handle, name in enumerate(_EMBEDDING_BAG_TENSORS, first):
        raw.put(handle, tensors[name])
    result = first + len(_EMBEDDING_BAG_TENSORS)
    handles = [h(first + i) for i in range(len(_EMBEDDING_BAG_TENSORS))]
    _, error = op_sync(raw, "aten::_embedding_bag_backward", [*handles, 6, False, mode, False, None, -1], outs=[result])
    return result, error


@pytest.mark.parametrize("mode, forged, word", [
    (1, {"offset2bag": torch.tensor([0, 0, 1, 1 << 40])}, "offset2bag"),  # a bag far past grad's rows
    (1, {"offset2bag": torch.tensor([0, 0, 1, -5])}, "offset2bag"),
    (1, {"offset2bag": torch.tensor([0, 0, 1])}, "offset2bag"),  # one bag short of the indices
    (1, {"bag_size": torch.tensor([2])}, "bag_size"),  # mean mode divides by bag_size[bag 1]
    (1, {"indices": torch.tensor([1, 2, 4, 1 << 40])}, "indices"),  # a word far past num_weights
    (1, {"indices": torch.tensor([1.0, 2.0, 4.0, 5.0])}, "indices"),
    (2, {"maximum_indices": torch.tensor([[1, 2, 1], [4, 1 << 40, 5]])}, "maximum_indices"),
    (2, {"maximum_indices": torch.tensor([[1, 2, 1]])}, "maximum_indices"),  # one bag of two
    # An empty offset2bag is rebuilt from offsets, which then must start at 0 and never decrease.
    (0, {"offset2bag": torch.tensor([], dtype=torch.int64), "offsets": torch.tensor([2, 0])}, "offsets"),
    (0, {"offset2bag": torch.tensor([], dtype=torch.int64), "offsets": torch.tensor([0, 1 << 40])}, "offsets"),
    (0, {"offset2bag": torch.tensor([], dtype=torch.int64), "offsets": torch.tensor([0, 1, 2])}, "offsets"),
])
def test_embedding_bag_backward_with_forged_bookkeeping_is_refused_and_the_daemon_lives(server, raw, mode, forged, word):
    result, error = _embedding_bag_backward(raw, _embedding_bag_arguments(**forged), mode, first=1)
    assert_refused(error, f"'{word}'")
    assert_never_computed(raw, result)
    # The honest call runs and computes what local torch computes.
    honest = _embedding_bag_arguments()
    result, error = _embedding_bag_backward(raw, honest, mode, first=11)
    assert error is None, error
    expected = torch.ops.aten._embedding_bag_backward(*honest.values(), 6, False, mode, False, None, -1)
    assert raw.fetch(result).equal(expected)
    assert_daemon_serves(server)


@pytest.mark.parametrize("indices, offsets, word", [
    ([1, 2, -3, 5], [0, 2], "'indices'"),  # CUDA reads the row before the table: no check there
    ([1, 2, 4, 1 << 40], [0, 2], "'indices'"),  # CUDA device-asserts: every tenant's context ends
    ([1, 2, 4, 5], [0, 1 << 20], "'offsets'"),  # CUDA walks indices up to 2**20: past their end
    ([1, 2, 4, 5], [0, 3, 1], "'offsets'"),  # decreasing: a device assert on CUDA
])
def test_embedding_bag_forward_with_forged_indices_or_offsets_is_refused(server, raw, indices, offsets, word):
    raw.put(1, torch.ones(6, 3))
    raw.put(2, torch.tensor(indices))
    raw.put(3, torch.tensor(offsets))
    _, error = op_sync(raw, "aten::_embedding_bag", [h(1), h(2), h(3)], outs=[4, 5, 6, 7])
    assert_refused(error, word)
    assert_never_computed(raw, 4)
    raw.put(8, torch.tensor([1, 2, 4, 5]))
    raw.put(9, torch.tensor([0, 2]))
    _, error = op_sync(raw, "aten::_embedding_bag", [h(1), h(8), h(9)], outs=[4, 5, 6, 7])
    assert error is None, error
    assert raw.fetch(4).tolist() == [[2.0] * 3, [2.0] * 3]
    assert_daemon_serves(server)


def test_per_sample_weights_backward_with_a_forged_offset2bag_is_refused(server, raw):
    name = "aten::_embedding_bag_per_sample_weights_backward"
    raw.put(1, torch.ones(2, 3))  # grad: two bags
    raw.put(2, torch.ones(6, 3))  # the embedding table
    raw.put(3, torch.tensor([1, 2, 4, 5]))
    raw.put(4, torch.tensor([0, 2]))
    raw.put(5, torch.tensor([0, 0, 1, 1 << 40]))  # reads grad's row 2**40
    _, error = op_sync(raw, name, [h(1), h(2), h(3), h(4), h(5), 0, -1], outs=[6])
    assert_refused(error, "'offset2bag'")
    assert_never_computed(raw, 6)
    raw.put(7, torch.tensor([1, 2, 4, 1 << 40]))  # reads the table's row 2**40
    raw.put(8, torch.tensor([0, 0, 1, 1]))
    _, error = op_sync(raw, name, [h(1), h(2), h(7), h(4), h(8), 0, -1], outs=[9])
    assert_refused(error, "'indices'")
    _, error = op_sync(raw, name, [h(1), h(2), h(3), h(4), h(8), 0, -1], outs=[10])
    assert error is None, error
    assert raw.fetch(10).tolist() == [3.0] * 4
    assert_daemon_serves(server)


def test_batch_norm_with_too_small_running_stats_is_refused(server, raw):
    raw.put(1, torch.ones(2, 3))  # 3 channels
    raw.put(2, torch.zeros(1))  # running stats for one: the kernel would write past them
    raw.put(3, torch.ones(1))
    _, error = op_sync(raw, "aten::native_batch_norm", [h(1), None, None, h(2), h(3), True, 0.1, 1e-5], outs=[4, 5, 6])
    assert_refused(error, "running_mean")
    assert_never_computed(raw, 4)
    raw.put(7, torch.zeros(3))
    raw.put(8, torch.ones(3))
    _, error = op_sync(raw, "aten::native_batch_norm", [h(1), None, None, h(7), h(8), True, 0.1, 1e-5], outs=[4, 5, 6])
    assert error is None, error
    assert_daemon_serves(server)


def test_a_backward_cannot_read_past_its_saved_output(raw):
    raw.put(1, torch.ones(200, 300))  # a large gradient
    raw.put(2, torch.ones(2, 3))  # a small "saved output": the kernel would read 60,000 floats of it
    _, error = op_sync(raw, "aten::_log_softmax_backward_data", [h(1), h(2), 1, F32], outs=[3])
    assert_refused(error, "one shape")
    assert_never_computed(raw, 3)


# ------------------------------------------------------------------------------------------------
# Sparse constructors and results without storage
# ------------------------------------------------------------------------------------------------
def test_sparse_constructors_with_unchecked_indices_are_refused(raw):
    raw.put(1, torch.tensor([[1 << 20]]))  # an index far outside the declared size
    raw.put(2, torch.ones(1))
    coo = {"layout": torch_codec.layout_ext(torch.sparse_coo), "device": DEVICE}
    for name, args, words in [
        ("aten::sparse_coo_tensor.indices_size", [h(1), h(2), [2]], ("invariant checks", "index 1048576")),
        ("aten::_sparse_coo_tensor_with_dims_and_tensors", [1, 0, [2], h(1), h(2)], ("invariant checks",)),
        ("aten::_sparse_coo_tensor_unsafe", [h(1), h(2), [2]], ("refused by the daemon's op policy",)),
    ]:
        _, error = op_sync(raw, name, args, coo, outs=[3])
        assert_refused(error, *words)
        assert_never_computed(raw, 3)


def test_results_without_storage_are_refused_and_the_session_closes_cleanly(server):
    with RawClient(server.address) as client:
        assert client.hello()[0] == Msg.WELCOME
        client.put(1, torch.ones(2, 3))
        for name, args, kwargs in [
            ("aten::to_mkldnn", [h(1)], {}),
            ("aten::_add_batch_dim", [h(1), 0, 1], {}),
            ("aten::empty.memory_format", [[2]], {"layout": 1}),  # a raw int: sparse_coo
            ("aten::empty.memory_format", [[2]], {"dtype": torch_codec.dtype_ext(torch.qint8)}),
        ]:
            _, error = op_sync(client, name, args, kwargs, outs=[2])
            assert_refused(error)
            assert_never_computed(client, 2)
        memory = client.memory()
        client.send([Msg.BYE])
    # Session close walked the handle table; the daemon is alive and logged no traceback.
    assert_daemon_serves(server)
    assert "Traceback" not in server.log() and "KeyError" not in server.log(), server.log()[-3000:]
    assert memory["allocated"] == 2 * 3 * 4, memory


def test_the_store_refuses_results_without_storage_before_keeping_anything():
    """The last line of defence, below the op policy: a session never keeps a result it could not
    charge, free or hand to a kernel, and closes cleanly after refusing one."""
    from libremote_server.worker.session import CommandError, Session

    session = Session("store-test", [torch.device("cpu")], {})
    session._store(1, torch.ones(3))
    for handle, tensor in [(2, torch.sparse_coo_tensor([[7]], [1.0], (3,), check_invariants=False)),
                           (3, torch.ones(3).to_mkldnn()),
                           (4, torch.ops.aten._add_batch_dim(torch.ones(3), 0, 1)),
                           (5, torch.ones(3, device="meta"))]:
        with pytest.raises(CommandError) as refused:
            session._store(handle, tensor)
        assert refused.value.kind.value == "refused"
        assert handle not in session.tensors and handle not in session._storage_keys
    assert session.memory.allocated == 12
    assert session.close() == 12
    assert session.memory.allocated == 0 and not session.tensors


# ------------------------------------------------------------------------------------------------
# Enum and device arguments
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, args, kwargs", [
    ("aten::_to_copy", [h(1)], {"dtype": -1}),  # SIGSEGV in the kernel without the check
    ("aten::_to_copy", [h(1)], {"dtype": 6}),  # even a valid enum value: dtypes travel as EXT_DTYPE
    ("aten::empty.memory_format", [[2]], {"dtype": 3}),
    ("aten::sum.default", [h(1)], {"dtype": -5}),
    ("aten::empty_like", [h(1)], {"memory_format": -1}),
    ("aten::clone", [h(1)], {"memory_format": 7}),
])
def test_raw_integers_in_enum_arguments_are_refused(server, raw, name, args, kwargs):
    raw.put(1, torch.ones(4))
    _, error = op_sync(raw, name, args, kwargs, outs=[2])
    assert_refused(error, "must be a")
    assert_never_computed(raw, 2)
    _, error = op_sync(raw, "aten::_to_copy", [h(1)], {"dtype": F64}, outs=[3])  # the wire's own dtype
    assert error is None, error
    assert raw.fetch(3).dtype == torch.float64
    assert_daemon_serves(server)


@pytest.mark.parametrize("device", ["cpu", "cuda:1", "privateuseone", "meta", 0, "cuda"])
def test_device_strings_cannot_escape_the_sessions_devices(raw, device):
    raw.put(1, torch.ones(4))
    for name, args, kwargs in [
        ("aten::_to_copy", [h(1)], {"device": device}),
        ("aten::empty.memory_format", [[2]], {"device": device}),
        ("aten::to.device", [h(1), device, F32], {}),
    ]:
        _, error = op_sync(raw, name, args, kwargs, outs=[2])
        assert_refused(error, "not one of this session's devices")
        assert_never_computed(raw, 2)
    _, error = op_sync(raw, "aten::_to_copy", [h(1)], {"device": DEVICE}, outs=[3])  # a device reference
    assert error is None, error


def test_a_graph_node_with_a_raw_integer_dtype_is_refused_when_it_runs(server, raw):
    raw.put(1, torch.ones(4))
    node = ["aten::_to_copy", [codec.value_ext(0)], {"dtype": -1}]
    _, error, _ = raw.call([[Cmd.GRAPH, 1, 1, [node], [codec.value_ext(1)]],
                            [Cmd.RUN_GRAPH, 1, [h(1)], [2]]])
    assert_refused(error, "must be a")
    assert_never_computed(raw, 2)
    assert_daemon_serves(server)


# ------------------------------------------------------------------------------------------------
# Process-wide state
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, args", [
    ("aten::_cufft_set_plan_cache_max_size", [0, 0]),
    ("aten::_cufft_clear_plan_cache", [0]),
    ("aten::_cudnn_init_dropout_state", [0.5, True, 1234]),
    ("aten::_nnpack_available", []),
])
def test_process_wide_knobs_are_refused(raw, name, args):
    _, error = op_sync(raw, name, args, {"dtype": F32, "device": DEVICE} if "dropout" in name else {})
    assert_refused(error, "process-wide state")
