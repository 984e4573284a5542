"""The daemon as a trust boundary for memory: no tenant reads bytes it did not write, and every
byte a session causes is charged to it (or refused before it is allocated).

Tenant A writes a secret pattern into large tensors and frees them; the daemon's allocator (malloc's
heap on the CPU backend, which keeps freed memory for reuse: server/host_memory.py; CUDA's caching
allocator on a GPU) hands those blocks to the next allocation, which is tenant B's. B then allocates
through each path that returns memory an op does not fully write, reads every byte of the storage
(``as_strided`` over the whole storage, then FETCH) and must find none of A's bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from libremote_wire import codec, torch_codec
from libremote_wire.messages import Cmd, Msg

from conftest import Daemon, client_connected_to
from raw_client import RawClient

SECRET = 0xA5
#: Each secret tensor; B's allocations below are about this size, so they reuse A's blocks.
BLOCK = 1 << 20
U8 = torch_codec.dtype_ext(torch.uint8)
DEVICE = {"device": codec.device_ext(0)}
H = codec.handle_ext


@pytest.fixture(scope="module")
def isolation_daemon() -> Iterator[Daemon]:
    server = Daemon()
    yield server
    server.stop()


def _client(address: str) -> RawClient:
    client = RawClient(address)
    header = client.hello()
    assert header[0] == Msg.WELCOME, header
    return client


@pytest.fixture
def tenants(isolation_daemon: Daemon) -> Iterator[tuple[RawClient, RawClient]]:
    """Tenant A (who leaves secrets in freed memory) and tenant B (who must not see them)."""
    with _client(isolation_daemon.address) as a, _client(isolation_daemon.address) as b:
        yield a, b


def leave_secrets(a: RawClient, count: int = 8) -> None:
    """A writes the secret into ``count`` blocks of about BLOCK bytes and frees them all."""
    for index in range(count):
        a.put(1000 + index, torch.full((BLOCK + 4096 * index,), SECRET, dtype=torch.uint8))
    _, error, _ = a.call([[Cmd.FREE, [1000 + index for index in range(count)]], [Cmd.SYNC]])
    assert error is None, error


def op(op_id: int, name: str, args: list[Any], kwargs: dict[str, Any], outs: list[Any]) -> list[Any]:
    return [Cmd.OP, [op_id, name], args, kwargs, outs]


def whole_storage(b: RawClient, handle: int, nbytes: int, view: int = 900) -> torch.Tensor:
    """Every byte of the storage under B's ``handle`` (a uint8 tensor of ``nbytes`` elements)."""
    _, error, _ = b.call([op(90, "aten::as_strided.default", [H(handle), [nbytes], [1], 0], {}, [view])])
    assert error is None, error
    data = b.fetch(view)
    assert data.numel() == nbytes
    return data


def assert_no_secret(data: torch.Tensor, what: str) -> None:
    leaked = int((data == SECRET).sum())
    assert leaked == 0, f"{what}: tenant B read {leaked} bytes of tenant A's freed memory"


def test_empty_strided_gaps_are_zeroed(tenants):
    # Fails before: only the view's elements were zeroed (result.zero_()), not the gaps between rows.
    a, b = tenants
    leave_secrets(a)
    shape, stride = [1024, 512], [1024, 1]  # each row uses half of its 1024 bytes
    nbytes = 1023 * 1024 + 512
    _, error, _ = b.call([op(1, "aten::empty_strided.default", [shape, stride], {"dtype": U8, **DEVICE}, [1])])
    assert error is None, error
    assert_no_secret(whole_storage(b, 1, nbytes), "empty_strided")


def test_new_empty_strided_gaps_are_zeroed(tenants):
    # Fails before, as empty_strided.
    a, b = tenants
    b.put(1, torch.ones(4, dtype=torch.uint8))
    leave_secrets(a)
    _, error, _ = b.call([op(1, "aten::new_empty_strided.default", [H(1), [1024, 512], [1024, 1]], {}, [2])])
    assert error is None, error
    assert_no_secret(whole_storage(b, 2, 1023 * 1024 + 512), "new_empty_strided")


@pytest.mark.parametrize("name, args", [
    # resize_: fails before (the grown tail was never written).
    ("aten::resize_.default", lambda: [H(1), [BLOCK]]),
    # The functional resize (a clone grown in one kernel): fails before.
    ("aten::resize.default", lambda: [H(1), [BLOCK]]),
])
def test_storage_growth_is_zeroed(tenants, name, args):
    a, b = tenants
    b.put(1, torch.full((16,), 7, dtype=torch.uint8))
    b.put(3, torch.ones(1, dtype=torch.uint8))
    leave_secrets(a)
    _, error, _ = b.call([op(1, name, args(), {}, [2])])
    assert error is None, error
    data = whole_storage(b, 2, BLOCK)
    assert torch.equal(data[:16], torch.full((16,), 7, dtype=torch.uint8)), "the old bytes stay"
    assert_no_secret(data, name)


@pytest.mark.parametrize("name, args", [
    # set_ with an extent past the source's storage would grow that storage (torch does), with
    # bytes nobody wrote: fails before (the grown tail held the other tenant's bytes).
    ("aten::set_.source_Tensor_storage_offset", lambda: [H(3), H(1), 0, [BLOCK], [1]]),
    # An empty view placed past its storage's end, which an out= op would grow the storage up to,
    # writing only the view's elements: fails before (the gap held the other tenant's bytes).
    ("aten::as_strided.default", lambda: [H(1), [0], [1], BLOCK - 8]),
])
def test_views_past_their_storage_are_refused_so_nothing_grows_into_freed_memory(tenants, name, args):
    # The op rules (server/op_rules.py) check every explicit view geometry against its storage;
    # server/zeroing.py would zero such growth too, but the daemon never gets that far.
    a, b = tenants
    b.put(1, torch.full((16,), 7, dtype=torch.uint8))
    b.put(3, torch.ones(1, dtype=torch.uint8))
    leave_secrets(a)
    _, error, _ = b.call([op(1, name, args(), {}, [2])])
    assert error is not None and error[0] == "refused" and "storage holds 16" in error[2], error
    assert torch.equal(whole_storage(b, 1, 16), torch.full((16,), 7, dtype=torch.uint8)), "nothing grew"


def test_what_a_data_sized_result_leaves_of_its_storage_is_zeroed(tenants):
    # unique_consecutive allocates for the worst case (every element distinct) and shrinks the
    # result's sizes, not its storage: one float shown on a 1 MiB storage. Fails before.
    a, b = tenants
    b.put(1, torch.zeros(BLOCK // 4))
    leave_secrets(a)
    _, error, _ = b.call([op(1, "aten::unique_consecutive.default", [H(1)], {}, [2, None, None]),
                          op(2, "aten::view.dtype", [H(2), U8], {}, [3])])
    assert error is None, error
    data = whole_storage(b, 3, BLOCK)
    assert_no_secret(data, "unique_consecutive")
    assert torch.equal(data[:4], torch.zeros(4, dtype=torch.uint8))


def test_placeholders_of_a_step_recorded_without_running_are_zeroed(tenants):
    # torch.cuda.graph's results exist before the first replay; fails before (torch.empty).
    a, b = tenants
    b.put(1, torch.ones(4, dtype=torch.uint8))
    leave_secrets(a)
    add = op(1, "aten::add.Tensor", [H(1), H(1)], {}, [2])
    _, error, _ = b.call([[Cmd.PROGRAM, 1, [add], {"ran": False, "placeholders": [[2, U8, [BLOCK // 2], [2], 0, 0]]}]])
    assert error is None, error
    assert_no_secret(whole_storage(b, 2, BLOCK - 1), "placeholder")


def test_quantized_empty_is_refused_or_zeroed(tenants):
    # _empty_affine_quantized was not in the zero-filled list: fails before (unless refused).
    a, b = tenants
    leave_secrets(a)
    _, error, _ = b.call([op(1, "aten::_empty_affine_quantized.default", [[BLOCK]],
                             {"dtype": torch_codec.dtype_ext(torch.quint8), "device": codec.device_ext(0),
                              "scale": 1.0, "zero_point": 0}, [1]),
                          op(2, "aten::int_repr.default", [H(1)], {}, [2])])
    if error is not None:
        assert error[0] == "refused", error
        return
    assert_no_secret(b.fetch(2), "_empty_affine_quantized")


# ------------------------------------------------------------------------------------------------
# Every byte a session causes is charged, or refused before it is allocated
# ------------------------------------------------------------------------------------------------
QUOTA = 64 << 20
GIB = 1 << 30
F32 = torch_codec.dtype_ext(torch.float32)
V = codec.value_ext


@pytest.fixture(scope="module")
def quota_daemon() -> Iterator[Daemon]:
    server = Daemon("--memory-quota", "64MiB")
    yield server
    server.stop()


@pytest.fixture
def quota_client(quota_daemon: Daemon) -> Iterator[RawClient]:
    with _client(quota_daemon.address) as client:
        yield client


def peak_rss(pid: int) -> int:
    """The process's peak resident memory (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


# Each asks for 1 GiB (2**28 float32 elements) from a session with a 64 MiB quota. Handle 1 is a
# one-element float32 tensor, handle 2 a 16384-element one, handle 3 the int64 scalar 2**27.
ONE_GIB_REQUESTS = {
    "empty": [op(1, "aten::empty.memory_format", [[1 << 28]], {"dtype": F32, **DEVICE}, [10])],
    "zeros": [op(1, "aten::zeros.default", [[1 << 28]], {"dtype": F32, **DEVICE}, [10])],
    "full": [op(1, "aten::full.default", [[1 << 14, 1 << 14], 3.0], {"dtype": F32, **DEVICE}, [10])],
    "expand+contiguous": [op(1, "aten::expand.default", [H(1), [1 << 28]], {}, [9]),
                          op(2, "aten::clone.default", [H(9)], {}, [10])],
    "repeat": [op(1, "aten::repeat.default", [H(1), [1 << 28]], {}, [10])],
    "outer product (mm)": [op(1, "aten::view.default", [H(2), [1 << 14, 1]], {}, [8]),
                           op(2, "aten::view.default", [H(2), [1, 1 << 14]], {}, [9]),
                           op(3, "aten::mm.default", [H(8), H(9)], {}, [10])],
    # An empty operand's zero taken for its size: 16384x0 @ 0x16384 makes 2**28 zeros.
    "mm of empty matrices": [op(1, "aten::empty.memory_format", [[1 << 14, 0]], {"dtype": F32, **DEVICE}, [8]),
                             op(2, "aten::empty.memory_format", [[0, 1 << 14]], {"dtype": F32, **DEVICE}, [9]),
                             op(3, "aten::mm.default", [H(8), H(9)], {}, [10])],
    "broadcast add": [op(1, "aten::view.default", [H(2), [1 << 14, 1]], {}, [8]),
                      op(2, "aten::add.Tensor", [H(8), H(2)], {}, [10])],
    "cat of expanded views": [op(1, "aten::expand.default", [H(1), [1 << 27]], {}, [9]),
                              op(2, "aten::cat.default", [[H(9), H(9)]], {}, [10])],
    "resize_": [op(1, "aten::resize_.default", [H(1), [1 << 28]], {}, [None])],
    "diag of a vector": [op(1, "aten::diag.default", [H(2)], {}, [10])],
    "einsum outer product": [op(1, "aten::einsum.default", ["i,j->ij", [H(2), H(2)]], {}, [10])],
    # Sized by its data: a count per value up to the largest (handle 3 holds 2**27).
    "bincount": [op(1, "aten::bincount.default", [H(3)], {}, [10])],
}


@pytest.mark.parametrize("request_name", list(ONE_GIB_REQUESTS))
def test_a_request_past_the_quota_is_refused_before_anything_is_allocated(quota_daemon, quota_client, request_name):
    # Fails before for every case: the op ran, the session's peak (and, for the ops that write
    # their output, the daemon's RSS) took the 1 GiB, and only then was it undone.
    raw = quota_client
    raw.put(1, torch.tensor([2.0]))
    raw.put(2, torch.arange(1 << 14, dtype=torch.float32))
    raw.put(3, torch.tensor([1 << 27]))
    before = raw.memory()
    rss_before = peak_rss(quota_daemon.process.pid)  # (a GPU daemon's CUDA context alone is ~600 MiB)
    _, error, _ = raw.call(ONE_GIB_REQUESTS[request_name])
    assert error is not None and error[0] == "oom", error
    assert "quota" in error[2] and "64.00 MiB" in error[2], error
    after = raw.memory()
    assert after["peak"] - before["allocated"] < QUOTA, f"the daemon allocated it: peak {after['peak']}"
    dropped = 4 if request_name == "resize_" else 0  # (see below)
    assert after["allocated"] == before["allocated"] - dropped
    assert peak_rss(quota_daemon.process.pid) - rss_before < GIB // 2, "the daemon's memory took the request"
    # The session goes on, and the values it holds are intact (but for a tensor the client saw
    # resized: using it raises the same error, as when the quota is exceeded after an op).
    if request_name == "resize_":
        _, error, _ = raw.call([[Cmd.FETCH, 1]])
        assert error is not None and "resize_" in error[2] and "quota" in error[2], error
    else:
        assert torch.equal(raw.fetch(1), torch.tensor([2.0]))
    assert torch.equal(raw.fetch(2), torch.arange(1 << 14, dtype=torch.float32))


def test_graph_intermediates_are_charged(quota_client):
    # Ten 8 MiB intermediates alive at once (88 MiB with the input) under a 64 MiB quota; the
    # graph returns a scalar. Fails before: intermediates were not charged, the run succeeded.
    raw = quota_client
    raw.put(1, torch.ones(1 << 21))  # 8 MiB
    nodes = [["aten::mul.Tensor", [V(0), float(k)], {}] for k in range(1, 11)]  # values 1..10
    nodes.append(["aten::add.Tensor", [V(1), V(2)], {}])  # value 11
    for k in range(3, 11):  # values 12..19: a running sum that needs every product until its turn
        nodes.append(["aten::add.Tensor", [V(8 + k), V(k)], {}])
    nodes.append(["aten::sum.default", [V(19)], {}])  # value 20
    _, error, _ = raw.call([[Cmd.GRAPH, 1, 1, nodes, [V(20)]]])
    assert error is None, error
    before = raw.memory()["allocated"]
    _, error, _ = raw.call([[Cmd.RUN_GRAPH, 1, [H(1)], [2]]])
    assert error is not None and error[0] == "oom" and "quota" in error[2], error
    assert raw.memory()["allocated"] == before, "the run's intermediates are released"
    # Within the quota, the same graph on a smaller input runs, and its peak is seen.
    raw.put(3, torch.ones(1 << 18))  # 1 MiB: 11 MiB at once
    raw.call([[Cmd.QUERY, "reset_peak_memory"]])
    _, error, _ = raw.call([[Cmd.RUN_GRAPH, 1, [H(3)], [4]]])
    assert error is None, error
    assert raw.fetch(4).item() == 55.0 * (1 << 18)
    stats = raw.memory()
    assert stats["peak"] - before >= 10 << 20, stats
    assert stats["allocated"] == before + (1 << 20) + 4


def test_set_data_keeps_the_account_exact(quota_client):
    # t.data = other, as the op: the tensor now uses other's storage. Fails before: the handle
    # stayed charged for its old 16 bytes, and freeing `other` uncharged a storage still in use.
    raw = quota_client
    base = raw.memory()["allocated"]
    raw.put(1, torch.ones(1 << 20))  # 4 MiB
    raw.put(2, torch.ones(4))
    _, error, _ = raw.call([op(1, "aten::set_data.default", [H(2), H(1)], {}, []), [Cmd.FREE, [1]]])
    assert error is None, error
    assert raw.memory()["allocated"] == base + (4 << 20)
    assert torch.equal(raw.fetch(2), torch.ones(1 << 20))
    _, error, _ = raw.call([[Cmd.FREE, [2]]])
    assert error is None, error
    assert raw.memory()["allocated"] == base


def test_a_real_client_gets_cudas_out_of_memory_error_and_nothing_is_allocated(quota_daemon):
    # What a program sees: torch's OutOfMemoryError, as from CUDA, for each 1 GiB request; the
    # session's peak never includes it. Fails before: each request was allocated, then undone.
    with client_connected_to(quota_daemon.address) as libremote:
        small = torch.ones(4, device="cuda")
        requests = {
            "empty": lambda: torch.empty(1 << 28, device="cuda"),
            "zeros": lambda: torch.zeros(1 << 28, device="cuda"),
            "expand+contiguous": lambda: small[:1].expand(1 << 28).contiguous(),
            "repeat": lambda: small.repeat(1 << 26),
        }
        for name, request in requests.items():
            with pytest.raises(torch.OutOfMemoryError, match="quota"):
                request()
                libremote.synchronize()
            assert torch.cuda.max_memory_allocated() < QUOTA, name
        assert small.sum().item() == 4.0


def test_a_real_clients_rebind_keeps_the_account_exact(quota_daemon):
    # `t.data = other` (nn.Module._apply, optimizers' tricks) from a real client: the account
    # follows the storage, whichever handle holds it.
    import gc

    with client_connected_to(quota_daemon.address) as libremote:
        base = torch.cuda.memory_allocated()
        t = torch.zeros(1 << 20, device="cuda")  # 4 MiB
        other = torch.ones(1 << 21, device="cuda")  # 8 MiB
        t.data = other
        del other
        gc.collect()
        libremote.synchronize()
        assert torch.cuda.memory_allocated() - base == 8 << 20
        assert t.sum().item() == float(1 << 21)
        del t
        gc.collect()
        libremote.synchronize()
        assert torch.cuda.memory_allocated() == base
