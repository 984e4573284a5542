"""Sparse tensors (COO, CSR, CSC, BSR) on the remote device, compared with plain local torch.

A CPU daemon runs the same sparse kernels as local torch, so results are compared bit for bit
(``torch.equal``): construction, accessors, conversions, sparse-dense products, elementwise ops,
autograd, an unmodified GCN training loop (pytorch/examples' model: sparse features and a sparse
normalised adjacency), printing, ``torch.save``/``torch.load`` and memory figures. Then hostile
raw clients forge sparse tensors whose indices lie outside their size, compressed indices that
run backwards and false ``is_coalesced`` claims: the daemon refuses each with torch's own
invariant message and keeps serving (server/worker/sparse.py).
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from libremote_wire import codec, torch_codec
from libremote_wire.messages import Cmd, Msg

from conftest import Daemon
from raw_client import RawClient

aten = torch.ops.aten


def _coo(seed: int = 0, shape: tuple[int, int] = (6, 5), nnz: int = 9, coalesced: bool = False) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randint(0, shape[0], (nnz,), generator=generator),
                           torch.randint(0, shape[1], (nnz,), generator=generator)])
    values = torch.randn(nnz, generator=generator)
    tensor = torch.sparse_coo_tensor(indices, values, shape)
    return tensor.coalesce() if coalesced else tensor


def assert_same_sparse(remote: torch.Tensor, local: torch.Tensor) -> None:
    """``remote`` is a remote sparse tensor equal to ``local`` in layout, metadata and parts."""
    assert remote.is_cuda and remote.device == torch.device("cuda", 0)
    assert remote.layout == local.layout and remote.shape == local.shape and remote.dtype == local.dtype
    assert remote._nnz() == local._nnz()
    host = remote.cpu()
    assert host.layout == local.layout and not host.is_cuda
    if local.layout is torch.sparse_coo:
        assert remote.is_coalesced() == local.is_coalesced()
        assert torch.equal(host._indices(), local._indices()) and torch.equal(host._values(), local._values())
    else:
        assert torch.equal(host.values(), local.values())
        compressed = (torch.Tensor.crow_indices, torch.Tensor.col_indices) if local.layout in (
            torch.sparse_csr, torch.sparse_bsr) else (torch.Tensor.ccol_indices, torch.Tensor.row_indices)
        for accessor in compressed:
            assert torch.equal(accessor(host), accessor(local))
            assert torch.equal(accessor(remote).cpu(), accessor(local))
    assert torch.equal(host.to_dense(), local.to_dense())


# ------------------------------------------------------------------------------------------------
# Construction, accessors and conversions
# ------------------------------------------------------------------------------------------------
def test_construction_on_the_device_and_from_the_host(remote):
    local = _coo()
    made = torch.sparse_coo_tensor(local._indices(), local._values(), local.shape, device="cuda")
    assert type(made).__name__ == "RemoteSparseTensor"
    assert made.is_sparse and made.layout is torch.sparse_coo and made.is_cuda
    assert made.sparse_dim() == 2 and made.dense_dim() == 0
    assert_same_sparse(made, local)
    assert_same_sparse(local.cuda(), local)
    assert_same_sparse(local.to("cuda"), local)
    assert_same_sparse(local.coalesce().cuda(), local.coalesce())
    assert_same_sparse(local.to("cuda", torch.float64), local.double())
    # Hybrid (a dense dim) and an empty one
    hybrid = torch.sparse_coo_tensor(local._indices(), torch.randn(local._nnz(), 3), (*local.shape, 3))
    assert_same_sparse(hybrid.cuda(), hybrid)
    empty = torch.sparse_coo_tensor(size=(4, 4), device="cuda")
    assert_same_sparse(empty, torch.sparse_coo_tensor(size=(4, 4)))
    assert_same_sparse(torch.zeros(3, 4, layout=torch.sparse_coo, device="cuda"),
                       torch.zeros(3, 4, layout=torch.sparse_coo))


def test_to_sparse_coalesce_accessors_and_to_dense(remote):
    dense = torch.randn(6, 5) * (torch.rand(6, 5) > 0.6)
    on_device = dense.cuda()
    assert_same_sparse(on_device.to_sparse(), dense.to_sparse())
    assert_same_sparse(on_device.to_sparse(1), dense.to_sparse(1))
    local = _coo(1)
    remote_coo = local.cuda()
    coalesced = remote_coo.coalesce()
    assert_same_sparse(coalesced, local.coalesce())
    assert torch.equal(coalesced.indices().cpu(), local.coalesce().indices())
    assert torch.equal(coalesced.values().cpu(), local.coalesce().values())
    assert torch.equal(remote_coo._indices().cpu(), local._indices())
    assert torch.equal(remote_coo.to_dense().cpu(), local.to_dense())
    assert torch.equal(remote_coo.to_dense(), local.to_dense().cuda())
    with pytest.raises(RuntimeError, match="coalesced"):  # torch's own error, raised on the line
        remote_coo.indices()
        torch.cuda.synchronize()


@pytest.mark.parametrize("layout", [torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr])
def test_compressed_layouts(remote, layout):
    dense = torch.randn(6, 4) * (torch.rand(6, 4) > 0.5)
    convert = {torch.sparse_csr: lambda t: t.to_sparse_csr(), torch.sparse_csc: lambda t: t.to_sparse_csc(),
               torch.sparse_bsr: lambda t: t.to_sparse_bsr((2, 2))}[layout]
    local = convert(dense)
    on_device = convert(dense.cuda())
    assert on_device.layout is layout and on_device.is_sparse_csr == (layout is torch.sparse_csr)
    assert_same_sparse(on_device, local)
    assert_same_sparse(local.cuda(), local)
    assert torch.equal(on_device.to_dense().cpu(), dense)
    if layout is torch.sparse_csr:
        other = torch.randn(4, 3)
        assert torch.equal((on_device @ other.cuda()).cpu(), local @ other)
        assert torch.equal(torch.mm(on_device, other.cuda()).cpu(), torch.mm(local, other))
        made = torch.sparse_csr_tensor(local.crow_indices(), local.col_indices(), local.values(), local.shape,
                                       device="cuda")
        assert_same_sparse(made, local)
        assert_same_sparse(on_device.to_sparse(), local.to_sparse())  # CSR -> COO
        assert_same_sparse((on_device * 2), local * 2)


# ------------------------------------------------------------------------------------------------
# Sparse-dense products and elementwise ops
# ------------------------------------------------------------------------------------------------
def test_sparse_dense_products_are_bit_exact(remote):
    local = _coo(2, (7, 5), 12)
    dense = torch.randn(5, 3)
    bias = torch.randn(7, 3)
    sparse, other, add = local.cuda(), dense.cuda(), bias.cuda()
    for _ in range(2):  # the second call streams with the daemon's first answer
        assert torch.equal(torch.sparse.mm(sparse, other).cpu(), torch.sparse.mm(local, dense))
        assert torch.equal(torch.mm(sparse, other).cpu(), torch.mm(local, dense))
        assert torch.equal((sparse @ other).cpu(), local @ dense)
        assert torch.equal(torch.spmm(sparse, other).cpu(), torch.spmm(local, dense))
        assert torch.equal(torch.addmm(add, sparse, other).cpu(), torch.addmm(bias, local, dense))
        assert torch.equal(torch.addmm(add, sparse, other, beta=0.5, alpha=2.0).cpu(),
                           torch.addmm(bias, local, dense, beta=0.5, alpha=2.0))
        assert torch.equal(torch.sparse.addmm(add, sparse, other).cpu(), torch.sparse.addmm(bias, local, dense))
        assert torch.equal(torch.matmul(sparse, other).cpu(), torch.matmul(local, dense))
    # sparse @ sparse
    assert_same_sparse(torch.sparse.mm(sparse, local.t().cuda()), torch.sparse.mm(local, local.t()))


def test_elementwise_ops_and_reductions(remote):
    local = _coo(3)
    other_local = _coo(4)
    dense_local = torch.randn(*local.shape)
    sparse, other, dense = local.cuda(), other_local.cuda(), dense_local.cuda()
    assert_same_sparse(sparse * 2, local * 2)
    assert_same_sparse(-sparse, -local)
    assert_same_sparse(sparse + other, local + other_local)
    assert_same_sparse(sparse - other, local - other_local)
    assert_same_sparse(sparse * other, local * other_local)
    assert_same_sparse(sparse.mul(dense), local.mul(dense_local))
    assert_same_sparse(torch.sparse.sum(sparse, 1), torch.sparse.sum(local, 1))
    assert_same_sparse(sparse.t(), local.t())
    assert_same_sparse(sparse.transpose(0, 1), local.transpose(0, 1))
    assert_same_sparse(sparse.abs().sqrt(), local.abs().sqrt())
    assert_same_sparse(sparse.clone(), local.clone())
    assert_same_sparse(sparse.detach(), local.detach())
    assert torch.equal((dense + sparse).cpu(), dense_local + local)
    assert torch.equal(torch.sparse.sum(sparse).cpu(), torch.sparse.sum(local))
    assert torch.equal(sparse.sum().cpu(), local.sum())
    in_place = sparse.clone()
    in_place.mul_(3)
    assert_same_sparse(in_place, local * 3)
    accumulated = other.clone()
    accumulated.add_(sparse)
    assert_same_sparse(accumulated, other_local + local)
    assert_same_sparse(sparse.to(torch.float64), local.to(torch.float64))


# ------------------------------------------------------------------------------------------------
# Autograd and training
# ------------------------------------------------------------------------------------------------
def test_autograd_through_sparse_dense_products(remote):
    local = _coo(5, (6, 4), 10)
    weight_local = torch.randn(4, 3, requires_grad=True)
    bias_local = torch.randn(6, 3, requires_grad=True)
    weight = weight_local.detach().cuda().requires_grad_()
    bias = bias_local.detach().cuda().requires_grad_()
    sparse = local.cuda()
    for product in (torch.sparse.mm, torch.mm, torch.spmm, lambda a, b: a @ b):
        loss_local = (product(local, weight_local) * bias_local).tanh().sum()
        loss = (product(sparse, weight) * bias).tanh().sum()
        loss_local.backward()
        loss.backward()
        assert torch.equal(loss.cpu(), loss_local)
    assert torch.equal(weight.grad.cpu(), weight_local.grad)
    assert torch.equal(bias.grad.cpu(), bias_local.grad)
    # addmm's gradient for the dense operands
    weight.grad = weight_local.grad = None
    torch.addmm(bias_local, local, weight_local).square().sum().backward()
    torch.addmm(bias, sparse, weight).square().sum().backward()
    assert torch.equal(weight.grad.cpu(), weight_local.grad)


class GraphConv(nn.Module):
    """pytorch/examples gcn/main.py's layer, unmodified: ``torch.mm`` with the (sparse) input,
    ``torch.spmm`` with the sparse normalised adjacency."""

    def __init__(self, input_dim: int, output_dim: int, use_bias: bool = False) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.Tensor(input_dim, output_dim))
        nn.init.xavier_normal_(self.kernel)
        self.bias = None
        if use_bias:
            self.bias = nn.Parameter(torch.Tensor(output_dim))
            nn.init.zeros_(self.bias)

    def forward(self, input_tensor: torch.Tensor, adj_mat: torch.Tensor) -> torch.Tensor:
        support = torch.mm(input_tensor, self.kernel)
        output = torch.spmm(adj_mat, support)
        if self.bias is not None:
            output = output + self.bias
        return output


class GCN(nn.Module):
    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, use_bias: bool = True,
                 dropout_p: float = 0.1) -> None:
        super().__init__()
        self.gc1 = GraphConv(input_dim, hidden_dim, use_bias=use_bias)
        self.gc2 = GraphConv(hidden_dim, output_dim, use_bias=use_bias)
        self.dropout = nn.Dropout(dropout_p)

    def forward(self, input_tensor: torch.Tensor, adj_mat: torch.Tensor) -> torch.Tensor:
        x = self.gc1(input_tensor, adj_mat)
        x = F.relu(x)
        x = self.dropout(x)
        x = self.gc2(x, adj_mat)
        return F.log_softmax(x, dim=1)


def _graph(nodes: int = 40, features: int = 16, edges: int = 120, classes: int = 4):
    """gcn/main.py's ``load_cora`` on a random graph: sparse scaled features, a sparse adjacency
    with self-loops normalised as D^-1/2 (A + I) D^-1/2, all built with sparse ops."""
    generator = torch.Generator().manual_seed(7)
    features_dense = (torch.rand(nodes, features, generator=generator) > 0.7).float()
    scale_vector = torch.sum(features_dense, dim=1)
    scale_vector = 1 / scale_vector
    scale_vector[scale_vector == float("inf")] = 0
    scale_vector = torch.diag(scale_vector).to_sparse()
    features_dense = scale_vector @ features_dense
    labels = torch.randint(0, classes, (nodes,), generator=generator)
    pairs = torch.randint(0, nodes, (edges, 2), generator=generator)
    adj_mat = torch.sparse_coo_tensor(pairs.T, torch.ones(edges), (nodes, nodes))
    adj_mat = torch.eye(nodes) + adj_mat
    degree_mat = torch.sum(adj_mat, dim=1)
    degree_mat = torch.sqrt(1 / degree_mat)
    degree_mat[degree_mat == float("inf")] = 0
    degree_mat = torch.diag(degree_mat).to_sparse()
    adj_mat = degree_mat @ adj_mat @ degree_mat
    return features_dense.to_sparse(), labels, adj_mat.to_sparse()


def _train_gcn(device: str, steps: int = 5) -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    """gcn/main.py's training loop (train_iter and test), on ``device``."""
    features, labels, adj_mat = (t.to(device) for t in _graph())
    idx = torch.randperm(len(labels), generator=torch.Generator().manual_seed(3)).to(device)
    idx_val, idx_train = idx[:10], idx[10:]
    torch.manual_seed(0)
    gcn = GCN(features.shape[1], 8, int(labels.max().item()) + 1, True, 0.5).to(device)
    optimizer = torch.optim.Adam(gcn.parameters(), lr=0.01, weight_decay=5e-4)
    criterion = nn.NLLLoss()
    torch.manual_seed(1)  # the dropout masks: the device generator and the host one alike
    losses, val_losses = [], []
    for _ in range(steps):
        gcn.train()
        optimizer.zero_grad()
        output = gcn(features, adj_mat)
        loss = criterion(output[idx_train], labels[idx_train])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        gcn.eval()
        with torch.no_grad():
            output = gcn(features, adj_mat)
            val_losses.append(criterion(output[idx_val], labels[idx_val]).item())
            (output[idx_val].argmax(dim=1) == labels[idx_val]).float().sum().item()
    return losses, val_losses, {name: p.detach().cpu() for name, p in gcn.state_dict().items()}


def test_a_gcn_trains_as_on_the_host(remote):
    features, _, adj_mat = (t.cuda() for t in _graph())
    assert features.is_sparse and adj_mat.is_sparse and adj_mat.is_cuda
    remote_losses, remote_val, remote_state = _train_gcn("cuda")
    local_losses, local_val, local_state = _train_gcn("cpu")
    assert remote_losses == local_losses and remote_val == local_val
    for name, value in local_state.items():
        assert torch.equal(remote_state[name], value), name


# ------------------------------------------------------------------------------------------------
# Printing, checkpoints, memory
# ------------------------------------------------------------------------------------------------
def test_printing_is_cudas(remote):
    local = _coo(6, (3, 3), 4)
    text = repr(local.cuda())
    expected = repr(local).replace("size=(3, 3)", "device='cuda:0', size=(3, 3)")
    assert text == expected, (text, expected)
    csr = local.to_dense().to_sparse_csr()
    csr_text = repr(csr.cuda())
    contents = repr(csr).split(", size=")[0]  # torch wraps the suffixes to its line width
    assert csr_text.startswith(contents + ", device='cuda:0',"), (csr_text, contents)
    assert " ".join(csr_text.split()).endswith("size=(3, 3), nnz=4, layout=torch.sparse_csr)"), csr_text
    leaf = local.cuda().requires_grad_()
    assert " ".join(repr(leaf).split()).endswith("layout=torch.sparse_coo, requires_grad=True)")
    assert str(local.cuda()) == text


def test_save_and_load(remote):
    local = _coo(7, coalesced=True)
    csr = local.to_dense().to_sparse_csr()
    buffer = io.BytesIO()
    torch.save({"coo": local.cuda(), "csr": csr.cuda()}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)
    assert_same_sparse(loaded["coo"], local)
    assert_same_sparse(loaded["csr"], csr)
    buffer.seek(0)
    on_host = torch.load(buffer, map_location="cpu")
    assert not on_host["coo"].is_cuda and torch.equal(on_host["coo"].to_dense(), local.to_dense())
    assert on_host["coo"].is_coalesced()
    # A host checkpoint loads onto the device with map_location
    buffer = io.BytesIO()
    torch.save(local, buffer)
    buffer.seek(0)
    assert_same_sparse(torch.load(buffer, map_location="cuda"), local)


def test_memory_is_charged_for_indices_and_values(remote):
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    nnz = 1000
    local = torch.sparse_coo_tensor(torch.randint(0, 100, (2, nnz)), torch.randn(nnz), (100, 100))
    sparse = local.cuda()
    torch.cuda.synchronize()
    # indices (int64) and values (float32), plus the uploaded parts the client still holds: none
    assert torch.cuda.memory_allocated() - before >= nnz * (2 * 8 + 4)
    del sparse
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before


# ------------------------------------------------------------------------------------------------
# Hostile raw clients
# ------------------------------------------------------------------------------------------------
_op_ids = itertools.count(1)
#: What torch.sparse_coo_tensor passes its constructor op (without a layout, the op dispatches on
#: its dense arguments' key, which has no kernel for it).
COO = {"layout": torch_codec.layout_ext(torch.sparse_coo), "device": codec.device_ext(0)}


def h(handle: int) -> Any:
    return codec.handle_ext(handle)


@pytest.fixture(scope="module")
def server() -> Iterator[Daemon]:
    daemon = Daemon()
    yield daemon
    daemon.stop()


@pytest.fixture
def raw(server: Daemon) -> Iterator[RawClient]:
    with RawClient(server.address) as client:
        assert client.hello()[0] == Msg.WELCOME
        yield client


def op_sync(client: RawClient, name: str, args: list[Any], kwargs: dict[str, Any] | None = None,
            outs: list[Any] | None = None) -> tuple[list[Any], Any]:
    results, error, _ = client.call([[Cmd.OP_SYNC, [next(_op_ids), name], args, kwargs or {}, outs or [None]]])
    return results, error


def assert_refused(error: Any, *words: str) -> None:
    assert error is not None, "the op ran"
    kind, _, message = error
    assert kind == "refused", error
    for word in words:
        assert word in message, (word, error)


def assert_serves(server: Daemon, raw: RawClient) -> None:
    """The daemon is alive, this session still computes, and a fresh session runs sparse work."""
    assert server.process.poll() is None, f"the daemon died:\n{server.log()[-3000:]}"
    raw.put(90, torch.tensor([[0, 1], [1, 0]]))
    raw.put(91, torch.tensor([2.0, 3.0]))
    _, error = op_sync(raw, "aten::_sparse_coo_tensor_with_dims_and_tensors", [2, 0, [2, 2], h(90), h(91)], COO,
                       outs=[92])
    assert error is None, error
    _, error = op_sync(raw, "aten::_to_dense", [h(92)], outs=[93])
    assert error is None, error
    assert raw.fetch(93).tolist() == [[0.0, 2.0], [3.0, 0.0]]
    with RawClient(server.address) as other:
        assert other.hello()[0] == Msg.WELCOME
        other.put(1, torch.tensor([1.0, 2.0]))
        _, error = op_sync(other, "aten::mul.Tensor", [h(1), h(1)], outs=[2])
        assert error is None and other.fetch(2).tolist() == [1.0, 4.0]


def assert_never_computed(client: RawClient, handle: int) -> None:
    results, error, _ = client.call([[Cmd.FETCH, handle]])
    assert results == [None] and error[0] == "handle" and "never computed" in error[2], error


@pytest.mark.parametrize("indices, words", [
    ([[0, 1 << 40], [1, 0]], ("invariant checks", "size is 4 but found index 1099511627776")),
    ([[0, -5], [1, 0]], ("invariant checks", "negative index -5")),
    ([[0, 3], [1, 4]], ("invariant checks", "for dim 1, size is 4 but found index 4")),
])
def test_coo_indices_outside_the_size_are_refused(server, raw, indices, words):
    raw.put(1, torch.tensor(indices))
    raw.put(2, torch.ones(2))
    for name, args, kwargs in [
        ("aten::_sparse_coo_tensor_with_dims_and_tensors", [2, 0, [4, 4], h(1), h(2)], COO),
        ("aten::sparse_coo_tensor.indices_size", [h(1), h(2), [4, 4]], COO),
        ("aten::_sparse_coo_tensor_with_dims_and_tensors", [2, 0, [4, 4], h(1), h(2)], {**COO, "is_coalesced": True}),
    ]:
        _, error = op_sync(raw, name, args, kwargs, outs=[3])
        assert_refused(error, *words)
        assert_never_computed(raw, 3)
    assert_serves(server, raw)


@pytest.mark.parametrize("crow, col, words", [
    ([0, 5, 3], [2, 0, 2], ("invariant checks", "crow_indices")),  # runs past nnz, then backwards
    ([0, 1, 3], [2, 0, 1 << 30], ("invariant checks", "col_indices < ncols")),
    ([0, 1, 2], [2, 0, 2], ("invariant checks",)),  # ends before nnz
    ([-4, 1, 3], [2, 0, 2], ("invariant checks",)),
])
def test_compressed_indices_that_do_not_fit_are_refused(server, raw, crow, col, words):
    raw.put(1, torch.tensor(crow))
    raw.put(2, torch.tensor(col))
    raw.put(3, torch.ones(3))
    layout = torch_codec.layout_ext(torch.sparse_csr)
    _, error = op_sync(raw, "aten::sparse_compressed_tensor.comp_plain_value_size", [h(1), h(2), h(3), [2, 3]],
                       {"layout": layout, "device": codec.device_ext(0)}, outs=[4])
    assert_refused(error, *words)
    assert_never_computed(raw, 4)
    assert_serves(server, raw)


def test_a_false_coalesced_claim_is_refused_and_the_tensor_dropped(server, raw):
    raw.put(1, torch.tensor([[1, 0, 1], [2, 0, 2]]))  # duplicates, unsorted
    raw.put(2, torch.ones(3))
    _, error = op_sync(raw, "aten::_sparse_coo_tensor_with_dims_and_tensors", [2, 0, [2, 3], h(1), h(2)],
                       {**COO, "is_coalesced": True}, outs=[3])
    assert_refused(error, "uncoalesced")
    _, error = op_sync(raw, "aten::_sparse_coo_tensor_with_dims_and_tensors", [2, 0, [2, 3], h(1), h(2)], COO, outs=[3])
    assert error is None, error
    _, error = op_sync(raw, "aten::_coalesced_", [h(3), True])  # the flag, forged in place
    assert_refused(error, "wrote in place", "uncoalesced", "dropped")
    results, error, _ = raw.call([[Cmd.OP_SYNC, [next(_op_ids), "aten::_nnz"], [h(3)], {}, [None]]])
    assert error[0] == "handle" and "never computed" in error[2] and "_coalesced_" in error[2], error
    assert_serves(server, raw)


def test_indices_cannot_be_rewritten_after_the_check(server, raw):
    """A sparse tensor's indices share no storage with a handle the client can write: the
    constructor's index argument and the index accessors' results are copies."""
    raw.put(1, torch.tensor([[0, 1], [1, 0]]))
    raw.put(2, torch.ones(2))
    _, error = op_sync(raw, "aten::_sparse_coo_tensor_with_dims_and_tensors", [2, 0, [2, 2], h(1), h(2)], COO, outs=[3])
    assert error is None, error
    _, error = op_sync(raw, "aten::fill_.Scalar", [h(1), 1 << 40])  # the argument it was built from
    assert error is None, error
    for accessor in ("aten::_indices", "aten::indices"):
        _, error = op_sync(raw, "aten::_coalesce" if accessor == "aten::indices" else "aten::detach", [h(3)], outs=[4])
        assert error is None, error
        _, error = op_sync(raw, accessor, [h(4)], outs=[5])
        assert error is None, error
        _, error = op_sync(raw, "aten::fill_.Scalar", [h(5), 1 << 40])  # the accessor's result
        assert error is None, error
        raw.call([[Cmd.FREE, [4, 5]]])
    raw.put(6, torch.ones(2, 3))
    _, error = op_sync(raw, "aten::mm", [h(3), h(6)], outs=[7])
    assert error is None, error
    assert raw.fetch(7).tolist() == [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    results, error, _ = raw.call([[Cmd.FETCH, 3]])
    assert error is not None and "fetch its indices and values" in error[2], error
    assert_serves(server, raw)


def test_unaudited_sparse_kernels_are_refused(server, raw):
    raw.put(1, torch.tensor([0, 1 << 20, 3]))  # forged crow_indices
    raw.put(2, torch.tensor([0, 1, 2]))
    _, error = op_sync(raw, "aten::_convert_indices_from_csr_to_coo", [h(1), h(2)], outs=[3])
    assert_refused(error, "sparse_unaudited")
    _, error = op_sync(raw, "aten::_sparse_compressed_tensor_with_dims",
                       [1 << 20, 0, [4, 4], [], torch_codec.dtype_ext(torch.int64)],
                       {"layout": torch_codec.layout_ext(torch.sparse_csr)}, outs=[4])
    assert_refused(error, "sparse_unaudited")
    assert_serves(server, raw)


def test_sparse_memory_is_released_with_the_session(server):
    with RawClient(server.address) as client:
        assert client.hello()[0] == Msg.WELCOME
        client.put(1, torch.randint(0, 100, (2, 500)))
        client.put(2, torch.randn(500))
        _, error = op_sync(client, "aten::_sparse_coo_tensor_with_dims_and_tensors", [2, 0, [100, 100], h(1), h(2)],
                           COO, outs=[3])
        assert error is None, error
        allocated = client.memory()["allocated"]
        # the two uploads, and the sparse tensor's private copy of its indices (its values shared)
        assert allocated == 500 * 8 * 2 + 500 * 4 + 500 * 8 * 2, allocated
        client.call([[Cmd.FREE, [1, 3]]])
        assert client.memory()["allocated"] == 500 * 4
    assert server.process.poll() is None
    assert "Traceback" not in server.log(), server.log()[-3000:]
