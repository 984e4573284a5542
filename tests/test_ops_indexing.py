"""Indexing (slices, advanced indexing, scatter/gather, masks), views and memory
layout through libremote, checked against plain local torch on the CPU.

Each test builds host tensors, computes the expected answer locally, computes the same with the
tensors on ``cuda`` (the libremote daemon), brings the result back with ``.cpu()`` and compares
(tests/op_checks.py). Split from tests/test_ops.py by subject; the numbered sections keep their
numbers.
"""

from __future__ import annotations

import pytest
import torch
from op_checks import check, compare, randint, randn

# ==============================================================================================
# 5. Indexing
# ==============================================================================================
SLICES = {
    "int": lambda x: x[1], "neg_int": lambda x: x[-1], "range": lambda x: x[1:3], "step": lambda x: x[::2],
    "2d": lambda x: x[1:, ::3], "ellipsis": lambda x: x[..., 1], "none": lambda x: x[None, :, None],
    "mixed": lambda x: x[1, 2:, None, ...], "neg_range": lambda x: x[-3:-1, -4:], "empty_range": lambda x: x[3:1],
    "beyond_end": lambda x: x[2:100], "scalar_element": lambda x: x[2, 3],
}


@pytest.mark.parametrize("name", sorted(SLICES))
def test_basic_slicing(remote, name):
    x = randn(4, 6, 3)
    got, _ = check(SLICES[name], x, exact=True)


def test_negative_step_slicing_is_rejected(remote):
    x = randn(5)
    with pytest.raises(ValueError, match="step must be greater than zero"):
        x[::-1]
    with pytest.raises(ValueError, match="step must be greater than zero"):
        x.cuda()[::-1]
    check(lambda t: t.flip(0), x, exact=True)


ADVANCED = {
    "list": lambda x, i: x[[0, 2, 3]],
    "tensor": lambda x, i: x[i],
    "tensor_dim1": lambda x, i: x[:, i],
    "two_tensors": lambda x, i: x[i, i.flip(0)],
    "broadcast_index": lambda x, i: x[i[:, None], i[None, :]],
    "tensor_and_slice": lambda x, i: x[i, 1:3],
    "negative_indices": lambda x, i: x[i - 4],
    "2d_index": lambda x, i: x[i.view(2, 2)],
    "bool_list_dim": lambda x, i: x[:, [True, False, True, False, True]],
    "separated_adv": lambda x, i: x[i[:2], :, i[:2]],
}


@pytest.mark.parametrize("name", sorted(ADVANCED))
@pytest.mark.parametrize("index_on", ["cuda", "cpu"])
def test_advanced_integer_indexing(remote, name, index_on):
    x = randn(4, 5, 4)
    i = torch.tensor([3, 0, 2, 1])
    expected = ADVANCED[name](x, i)
    idx = i.cuda() if index_on == "cuda" else i
    got = ADVANCED[name](x.cuda(), idx)
    compare(got.cpu(), expected, exact=True)


def test_index_select_gather(remote):
    x = randn(5, 6)
    idx = torch.tensor([4, 0, 4, 2])
    check(lambda t, i: torch.index_select(t, 0, i), x, idx, exact=True)
    check(lambda t, i: t.index_select(1, i), x, idx, exact=True)
    g = randint(0, 6, (5, 3))
    check(lambda t, i: torch.gather(t, 1, i), x, g, exact=True)
    check(lambda t, i: t.gather(0, i % 5), x, g, exact=True)
    check(lambda t, i: torch.take(t, i), x, torch.tensor([0, 29, 7]), exact=True)
    check(lambda t, i: torch.take_along_dim(t, i, dim=1), x, g, exact=True)
    check(lambda t: torch.take_along_dim(t, t.argsort(1), dim=1), x, exact=True)
    check(lambda t: torch.take_along_dim(t, t.argmax(1, keepdim=True), dim=1), x, exact=True)


def test_scatter_family(remote):
    x = torch.zeros(4, 6)
    idx = torch.tensor([[0, 1, 2], [5, 4, 3], [1, 1, 1], [2, 0, 5]])
    src = randn(4, 3)
    check(lambda t, i, s: t.scatter(1, i, s), x, idx, src, exact=True)
    check(lambda t, i: t.scatter(1, i, 7.0), x, idx, exact=True)
    check(lambda t, i, s: t.scatter_add(1, i, s), x, idx, src)
    check(lambda t, i, s: t.scatter(1, i, s, reduce="multiply"), torch.ones(4, 6), idx, src)
    check(lambda t, i, s: t.scatter_reduce(1, i, s, reduce="amax", include_self=False), x, idx, src, exact=True)
    check(lambda t, i, s: t.scatter_reduce(1, i, s, reduce="mean"), x, idx, src)
    # in-place variants mutate the receiver
    check(lambda t, i, s: (t.scatter_(1, i, s), t)[1], x.clone(), idx, src, exact=True)
    check(lambda t, i, s: (t.scatter_add_(1, i, s), t)[1], x.clone(), idx, src)


def test_index_add_copy_fill(remote):
    x = randn(5, 3)
    idx = torch.tensor([0, 4, 0, 2])
    src = randn(4, 3, seed=1)
    check(lambda t, i, s: (t.index_add_(0, i, s), t)[1], x.clone(), idx, src)
    check(lambda t, i, s: t.index_add(0, i, s, alpha=2), x, idx, src)
    check(lambda t, i, s: t.index_copy(0, i[1:], s[1:]), x, idx, src, exact=True)
    check(lambda t, i: t.index_fill(1, i, -1.0), x, torch.tensor([0, 2]), exact=True)
    check(lambda t, i, s: t.index_reduce(0, i, s, "prod"), x, idx, src)


def test_index_put_via_setitem(remote):
    def put(t, i, v):
        t[i] = v
        return t

    x = randn(6, 4)
    idx = torch.tensor([0, 3, 5])
    check(put, x.clone(), idx, randn(3, 4, seed=1), exact=True)
    check(put, x.clone(), idx, 9.0, exact=True)
    check(lambda t, i: put(t, (i, i % 4), torch.tensor([1.0, 2.0, 3.0])), x.clone(), idx, exact=True)
    check(lambda t: put(t, (slice(None), 1), 0.5), x.clone(), exact=True)
    check(lambda t: put(t, (slice(1, 3), slice(None, None, 2)), -1.0), x.clone(), exact=True)
    check(lambda t, v: put(t, 2, v), x.clone(), randn(4, seed=2), exact=True)
    check(lambda t, i, v: t.index_put((i,), v, accumulate=True), x, torch.tensor([1, 1, 2]), randn(3, 4, seed=3))
    # setting with a CPU value tensor into a cuda tensor
    dev = x.cuda()
    dev[idx] = torch.full((3, 4), 4.0)
    expected = x.clone()
    expected[idx] = 4.0
    compare(dev.cpu(), expected, exact=True)


def test_index_put_with_cpu_index_into_cuda(remote):
    x = randn(6, 4)
    dev = x.cuda()
    idx = torch.tensor([1, 4])
    dev[idx] = 0.0
    x[idx] = 0.0
    compare(dev.cpu(), x, exact=True)


def test_masked_fill(remote):
    x = randn(4, 5)
    mask = x > 0.2
    check(lambda t, m: t.masked_fill(m, -1.0), x, mask, exact=True)
    check(lambda t, m, v: t.masked_fill(m, v), x, mask, torch.tensor(3.0), exact=True)  # 0-dim cuda value
    check(lambda t, m: (t.masked_fill_(m[0], float("-inf")), t)[1], x.clone(), mask, exact=True)  # broadcast mask
    check(lambda t, m, s: t.masked_scatter(m, s), x, mask, randn(20, seed=1), exact=True)


def test_masked_fill_with_zero_dim_cpu_value(remote):
    # CUDA accepts a 0-dim CPU tensor as the fill value (it reads it with .item()).
    x = randn(4, 5)
    check(lambda t: t.masked_fill(t > 0.2, torch.tensor(3.0)), x, exact=True)
    check(lambda t, i: t.index_fill(1, i, torch.tensor(-1.0)), x, torch.tensor([0, 2]), exact=True)


def test_boolean_mask_read_dynamic_shape(remote):
    x = randn(5, 6)
    got, expected = check(lambda t: t[t > 0], x, exact=True)
    assert got.shape == expected.shape and got.dim() == 1
    check(lambda t: t[t[:, 0] > 0], x, exact=True)  # row mask
    check(lambda t, m: t[m], x, x > 10, exact=True)  # empty result
    check(lambda t: t[t > 0].sum(), x)
    check(lambda t: (t[t > 0] * 2).shape, x)
    # a host mask on a device tensor
    dev = x.cuda()
    compare(dev[x > 0].cpu(), x[x > 0], exact=True)


def test_boolean_mask_write(remote):
    def zero_positive(t):
        t[t > 0] = 0
        return t

    check(zero_positive, randn(5, 6), exact=True)

    def write_tensor(t, m, v):
        t[m] = v
        return t

    x = randn(5, 6)
    mask = x < 0
    check(write_tensor, x.clone(), mask, torch.arange(int(mask.sum())).float(), exact=True)

    def rows(t):
        t[t[:, 0] > 0] = -5.0
        return t

    check(rows, x.clone(), exact=True)


def test_nonzero_and_where_one_arg(remote):
    x = randn(4, 5)
    x[x.abs() < 0.5] = 0
    got, _ = check(torch.nonzero, x, exact=True)
    assert got.dtype == torch.int64
    check(lambda t: torch.nonzero(t, as_tuple=True), x, exact=True)
    check(lambda t: torch.where(t != 0), x, exact=True)
    check(lambda t: torch.argwhere(t), x, exact=True)
    check(torch.nonzero, torch.zeros(3, 3), exact=True)  # no hits: shape (0, 2)
    check(lambda t: t.nonzero().shape, torch.zeros(2, 0))


def test_masked_select(remote):
    x = randn(4, 5)
    check(lambda t, m: torch.masked_select(t, m), x, x > 0, exact=True)
    check(lambda t, m: torch.masked_select(t, m), x, x[0] > 0, exact=True)  # broadcast mask


def test_unique(remote):
    x = torch.tensor([3, 1, 2, 3, 3, 0, 1, 7])
    check(lambda t: torch.unique(t), x, exact=True)
    check(lambda t: torch.unique(t, sorted=True, return_counts=True), x, exact=True)
    check(lambda t: torch.unique(t, return_inverse=True, return_counts=True), x, exact=True)
    check(lambda t: torch.unique(t, dim=0), torch.tensor([[1, 2], [3, 4], [1, 2]]), exact=True)
    check(lambda t: torch.unique_consecutive(t, return_counts=True), x, exact=True)
    check(lambda t: torch.unique(t), randn(10).round(), exact=True)


def test_repeat_interleave(remote):
    x = torch.tensor([[1, 2], [3, 4]])
    check(lambda t: t.repeat_interleave(2), x, exact=True)
    check(lambda t: t.repeat_interleave(3, dim=1), x, exact=True)
    check(lambda t, r: t.repeat_interleave(r, dim=0), x, torch.tensor([1, 3]), exact=True)
    check(lambda r: torch.repeat_interleave(r), torch.tensor([2, 0, 1]), exact=True)
    check(lambda t: t.repeat_interleave(torch.tensor([2, 1]), dim=0, output_size=3), x, exact=True)
    check(lambda t: t.repeat(2, 3), x, exact=True)
    check(lambda t: t.tile((2,)), x, exact=True)


def test_searchsorted_bucketize_histc_bincount(remote):
    edges = torch.tensor([0.0, 1.0, 2.5, 4.0])
    values = randn(10) * 3
    check(torch.searchsorted, edges, values, exact=True)
    check(lambda e, v: torch.searchsorted(e, v, right=True), edges, values, exact=True)
    check(lambda v, e: torch.bucketize(v, e), values, edges, exact=True)
    check(lambda v: torch.histc(v, bins=5, min=-3, max=3), values, exact=True)
    check(lambda v: torch.bincount(v), torch.tensor([0, 3, 3, 1, 5]), exact=True)
    check(lambda v, w: torch.bincount(v, w), torch.tensor([0, 3, 3, 1]), torch.tensor([0.5, 1.0, 2.0, 3.0]))


# ==============================================================================================
# 6. Views and memory layout
# ==============================================================================================
VIEWS = {
    "view": lambda x: x.view(6, 4), "view_infer": lambda x: x.view(-1, 2), "view_dtype": lambda x: x.view(torch.int32),
    "reshape": lambda x: x.reshape(4, 6), "reshape_noncontig": lambda x: x.t().reshape(-1),
    "transpose": lambda x: x.transpose(0, 1), "permute": lambda x: x.view(2, 3, 4).permute(2, 0, 1),
    "expand": lambda x: x[:1].expand(5, 6), "expand_as": lambda x: x[:, :1].expand_as(x),
    "squeeze": lambda x: x.view(1, 4, 1, 6).squeeze(), "squeeze_dim": lambda x: x.view(1, 4, 1, 6).squeeze(2),
    "unsqueeze": lambda x: x.unsqueeze(1), "narrow": lambda x: x.narrow(1, 2, 3),
    "unbind": lambda x: x.unbind(1), "split": lambda x: x.split(4, dim=1), "split_sizes": lambda x: x.split([1, 3], 0),
    "chunk": lambda x: x.chunk(3, 1), "tensor_split": lambda x: torch.tensor_split(x, 3, dim=1),
    "contiguous": lambda x: x.t().contiguous(), "t": lambda x: x.t(), "T": lambda x: x.T, "mT": lambda x: x.view(2, 2, 6).mT,
    "as_strided": lambda x: x.as_strided((3, 3), (2, 1), 1), "flatten": lambda x: x.view(2, 2, 6).flatten(1),
    "unflatten": lambda x: x.unflatten(1, (2, 3)), "movedim": lambda x: x.view(2, 2, 6).movedim(0, -1),
    "diagonal": lambda x: x.diagonal(), "select": lambda x: x.select(1, 3), "unfold": lambda x: x.unfold(1, 2, 2),
    "view_as_real": lambda x: torch.view_as_real(x.to(torch.complex64)), "real_imag": lambda x: x.to(torch.complex64).imag,
    "cat": lambda x: torch.cat([x, x * 2], 1), "stack": lambda x: torch.stack([x, x + 1], 0),
    "hstack": lambda x: torch.hstack([x, x]), "flip": lambda x: x.flip(0, 1), "roll": lambda x: x.roll(2, 1),
    "rot90": lambda x: torch.rot90(x), "swapaxes": lambda x: x.swapaxes(0, 1), "alias_clone": lambda x: x.clone(),
}


@pytest.mark.parametrize("name", sorted(VIEWS))
def test_views(remote, name):
    check(VIEWS[name], randn(4, 6), exact=True)


def test_view_strides_match_local(remote):
    x = randn(4, 6)
    d = x.cuda()
    for fn in (lambda t: t.t(), lambda t: t[:, 1::2], lambda t: t[1:].narrow(1, 1, 3), lambda t: t[:1].expand(3, 6),
               lambda t: t.view(2, 2, 6).permute(2, 0, 1), lambda t: t.unsqueeze(0), lambda t: t.as_strided((2, 2), (1, 4), 3)):
        local, remote_view = fn(x), fn(d)
        assert remote_view.shape == local.shape
        assert remote_view.stride() == local.stride()
        assert remote_view.storage_offset() == local.storage_offset()
        assert remote_view.is_contiguous() == local.is_contiguous()


@pytest.mark.parametrize(
    "make_view",
    [lambda x: x[0], lambda x: x[:, 1], lambda x: x.t(), lambda x: x.view(-1), lambda x: x.narrow(1, 1, 2),
     lambda x: x.unsqueeze(0), lambda x: x[1:3, ::2], lambda x: x.diagonal(), lambda x: x.unbind(0)[2]],
    ids=["row", "col", "t", "view", "narrow", "unsqueeze", "strided", "diagonal", "unbind"],
)
def test_in_place_on_view_changes_base(remote, make_view):
    x = randn(4, 5)
    d = x.cuda()
    make_view(x).add_(1)
    v = make_view(d)
    v.add_(1)
    compare(d.cpu(), x, exact=True)
    compare(v.cpu(), make_view(x), exact=True)


def test_in_place_on_base_visible_through_view(remote):
    x = randn(4, 5)
    d = x.cuda()
    v = d[1:, 2]
    d.mul_(2)
    compare(v.cpu(), (x * 2)[1:, 2], exact=True)
    d.zero_()
    assert torch.equal(v.cpu(), torch.zeros(3))


def test_views_of_views_share_storage(remote):
    x = torch.arange(24.0).view(4, 6)
    d = x.cuda()
    v = d.view(2, 12)[1].view(3, 4)[:, 1:3]
    v.fill_(-1)
    x.view(2, 12)[1].view(3, 4)[:, 1:3].fill_(-1)
    compare(d.cpu(), x, exact=True)


def test_channels_last_memory_format(remote):
    x = randn(2, 3, 4, 5)
    cl = x.to(memory_format=torch.channels_last)
    d = x.cuda().to(memory_format=torch.channels_last)
    assert d.is_contiguous(memory_format=torch.channels_last)
    assert d.stride() == cl.stride()
    back = d.cpu()
    assert back.stride() == cl.stride(), f"{back.stride()} != {cl.stride()}"
    assert back.is_contiguous(memory_format=torch.channels_last)
    compare(back, x, exact=True)
    # uploading a channels_last host tensor keeps its layout too
    d2 = cl.cuda()
    assert d2.stride() == cl.stride()
    assert d2.cpu().stride() == cl.stride()
    # ops preserve it as they do locally
    y = torch.relu(d2)
    assert y.stride() == torch.relu(cl).stride()
    assert y.cpu().stride() == torch.relu(cl).stride()


def test_transposed_cpu_keeps_strides(remote):
    x = randn(3, 5)
    back = x.cuda().t().cpu()
    compare(back, x.t(), exact=True)
    assert back.stride() == x.t().stride() == (1, 5)
    assert not back.is_contiguous()


def test_noncontiguous_cpu_fetch_values(remote):
    x = randn(4, 6)
    for fn in (lambda t: t[:, ::2], lambda t: t[1:, 2:].t(), lambda t: t[:1].expand(3, 6), lambda t: t.as_strided((2, 3), (1, 2), 5)):
        compare(fn(x.cuda()).cpu(), fn(x), exact=True)


def test_upload_of_noncontiguous_host_tensor(remote):
    x = randn(4, 6)
    for host in (x.t(), x[:, ::2], x[1:3], x[:1].expand(3, 6), x.as_strided((2, 2), (1, 3), 2)):
        compare(host.cuda().cpu(), host, exact=True)
