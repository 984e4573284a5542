"""The daemon as a trust boundary for memory: no tenant reads bytes it did not write, and every
byte a session causes is charged to it (or refused before it is allocated).

Tenant A writes a secret pattern into large tensors and frees them; the daemon's allocator (malloc's
heap on the CPU backend, which keeps freed memory for reuse: server/host_memory.py; CUDA's caching
allocator on a GPU) hands those blocks to the next allocation, which is tenant B's. B then allocates
through each path that returns memory an op does not fully write, reads every byte of the storage
(``as_strided`` over the whole storage, then FETCH) and must find none of A's bytes.
"""

from __future__ import annotations

from typing import Any, Iterator

import pytest
import torch

from conftest import Daemon
from raw_client import RawClient
from libremote import protocol
from libremote.protocol import Cmd, Msg

SECRET = 0xA5
#: Each secret tensor; B's allocations below are about this size, so they reuse A's blocks.
BLOCK = 1 << 20
U8 = protocol.dtype_ext(torch.uint8)
H = protocol.handle_ext


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
    _, error, _ = b.call([op(1, "aten::empty_strided.default", [shape, stride], {"dtype": U8, "device": protocol.device_ext(0)}, [1])])
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
    # set_ with an extent past the source's storage grows that storage: fails before.
    ("aten::set_.source_Tensor_storage_offset", lambda: [H(3), H(1), 0, [BLOCK], [1]]),
])
def test_storage_growth_is_zeroed(tenants, name, args):
    a, b = tenants
    b.put(1, torch.full((16,), 7, dtype=torch.uint8))
    b.put(3, torch.ones(1, dtype=torch.uint8))
    leave_secrets(a)
    results, error, _ = b.call([op(1, name, args(), {}, [2]), [Cmd.QUERY, "memory"]])
    assert error is None, error
    data = whole_storage(b, 2, BLOCK)
    assert torch.equal(data[:16], torch.full((16,), 7, dtype=torch.uint8)), "the old bytes stay"
    assert_no_secret(data, name)


def test_out_argument_growth_past_its_offset_is_zeroed(tenants):
    # An empty out= view placed past its storage's end: the op grows the storage up to the view and
    # writes only the view's elements; the bytes between the old end and the view were never
    # written. Fails before.
    a, b = tenants
    b.put(1, torch.ones(16, dtype=torch.uint8))
    b.put(2, torch.full((8,), 3, dtype=torch.uint8))
    _, error, _ = b.call([op(1, "aten::as_strided.default", [H(1), [0], [1], BLOCK - 8], {}, [3])])
    assert error is None, error
    leave_secrets(a)
    _, error, _ = b.call([op(2, "aten::add.out", [H(2), H(2)], {"out": H(3)}, [None])])
    assert error is None, error
    data = whole_storage(b, 1, BLOCK)
    assert torch.equal(data[:16], torch.ones(16, dtype=torch.uint8))
    assert torch.equal(data[-8:], torch.full((8,), 6, dtype=torch.uint8)), "the op's own elements stay"
    assert_no_secret(data, "add.out growth")


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
                             {"dtype": protocol.dtype_ext(torch.quint8), "device": protocol.device_ext(0),
                              "scale": 1.0, "zero_point": 0}, [1]),
                          op(2, "aten::int_repr.default", [H(1)], {}, [2])])
    if error is not None:
        assert error[0] == "refused", error
        return
    assert_no_secret(b.fetch(2), "_empty_affine_quantized")
