"""In-place ops and ``out=`` through libremote, checked against plain local torch on the CPU.

Each test builds host tensors, computes the expected answer locally, computes the same with the
tensors on ``cuda`` (the libremote daemon), brings the result back with ``.cpu()`` and compares
(tests/op_checks.py). Split from tests/test_ops.py by subject; the numbered sections keep their
numbers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from op_checks import compare, randn

# ==============================================================================================
# 7. In-place ops and out=
# ==============================================================================================
INPLACE = {
    "add_": lambda t, o: t.add_(o), "add_scalar_alpha": lambda t, o: t.add_(o, alpha=-2), "sub_": lambda t, o: t.sub_(1.5),
    "mul_": lambda t, o: t.mul_(o), "mul_scalar": lambda t, o: t.mul_(3), "div_": lambda t, o: t.div_(o.abs() + 1),
    "clamp_": lambda t, o: t.clamp_(-0.5, 0.5), "clamp_min_": lambda t, o: t.clamp_(min=0), "zero_": lambda t, o: t.zero_(),
    "fill_": lambda t, o: t.fill_(2.5), "fill_tensor": lambda t, o: t.fill_(torch.tensor(7.0)), "copy_": lambda t, o: t.copy_(o),
    "copy_bcast": lambda t, o: t.copy_(o[0]), "copy_dtype": lambda t, o: t.copy_(o.double()), "relu_": lambda t, o: t.relu_(),
    "exp_": lambda t, o: t.exp_(), "pow_": lambda t, o: t.pow_(2), "addcmul_": lambda t, o: t.addcmul_(o, o, value=0.1),
    "lerp_": lambda t, o: t.lerp_(o, 0.25), "masked_fill_": lambda t, o: t.masked_fill_(o > 0, 0.0),
    "F_relu_inplace": lambda t, o: F.relu(t, inplace=True), "sigmoid_": lambda t, o: t.sigmoid_(),
    "iadd": lambda t, o: t.__iadd__(o), "imul_int": lambda t, o: t.__imul__(2), "abs_": lambda t, o: t.abs_(),
    "neg_": lambda t, o: t.neg_(), "addmm_": lambda t, o: t[:4, :4].addmm_(o[:4], o[:4].t()),
}


@pytest.mark.parametrize("name", sorted(INPLACE))
def test_in_place_ops(remote, name):
    x, o = randn(4, 5), randn(4, 5, seed=1)
    d, od = x.cuda(), o.cuda()
    returned = INPLACE[name](d, od)
    INPLACE[name](x, o)
    compare(d.cpu(), x, atol=1e-6, rtol=1e-6)
    assert returned is d or name in ("addmm_",)  # in-place ops return their receiver


def test_in_place_type_promotion_errors(remote):
    d = torch.ones(3, dtype=torch.int64, device="cuda")
    with pytest.raises(RuntimeError, match="result type Float can't be cast"):
        d.add_(torch.ones(3, device="cuda") * 0.5)
    f = torch.ones(3, device="cuda")
    f.add_(torch.ones(3, dtype=torch.int64, device="cuda"))  # int into float is fine
    assert f.cpu().tolist() == [2.0, 2.0, 2.0]


def test_copy_between_cuda_tensors_with_dtype_and_layout(remote):
    src = randn(3, 4)
    dst = torch.zeros(4, 3, dtype=torch.float64, device="cuda")
    dst.copy_(src.cuda().t())
    compare(dst.cpu(), src.t().double(), exact=True)
    dst_t = torch.zeros(4, 3, device="cuda").t()  # non-contiguous destination
    dst_t.copy_(src.cuda())
    compare(dst_t.cpu(), src, exact=True)


def test_copy_from_cpu_into_cuda(remote):
    c = torch.zeros(3, 4, device="cuda")
    host = randn(3, 4)
    returned = c.copy_(host)
    assert returned is c
    compare(c.cpu(), host, exact=True)
    # dtype conversion and broadcasting in the upload
    c.copy_(torch.arange(4))
    compare(c.cpu(), torch.arange(4).float().expand(3, 4), exact=True)
    c.copy_(torch.arange(12, dtype=torch.int32).view(3, 4))
    compare(c.cpu(), torch.arange(12.0).view(3, 4), exact=True)
    # into a view of a cuda tensor: the base changes
    base = torch.zeros(4, 4, device="cuda")
    base[1:3, ::2].copy_(torch.ones(2, 2))
    expected = torch.zeros(4, 4)
    expected[1:3, ::2] = 1
    compare(base.cpu(), expected, exact=True)
    # from a non-contiguous host tensor
    c2 = torch.zeros(4, 3, device="cuda")
    c2.copy_(host.t())
    compare(c2.cpu(), host.t(), exact=True)


def test_copy_from_cuda_into_cpu(remote):
    src = randn(3, 4)
    d = src.cuda()
    host = torch.empty(3, 4)
    returned = host.copy_(d)
    assert returned is host
    compare(host, src, exact=True)
    host64 = torch.zeros(3, 4, dtype=torch.float64)
    host64.copy_(d)
    compare(host64, src.double(), exact=True)
    host_t = torch.zeros(4, 3)
    host_t.copy_(d.t())
    compare(host_t, src.t(), exact=True)
    row = torch.zeros(4)
    host_b = torch.zeros(2, 4)
    host_b.copy_(d[0])  # broadcast
    compare(host_b, src[0].expand(2, 4), exact=True)
    del row


def test_out_argument(remote):
    a, b = randn(3, 4), randn(3, 4, seed=1)
    c = torch.empty(3, 4, device="cuda")
    returned = torch.add(a.cuda(), b.cuda(), out=c)
    assert returned is c
    compare(c.cpu(), a + b, exact=True)
    torch.mul(a.cuda(), 2, out=c)
    compare(c.cpu(), a * 2, exact=True)
    m = torch.empty(3, 3, device="cuda")
    torch.mm(a.cuda(), b.cuda().t(), out=m)
    compare(m.cpu(), a @ b.t(), atol=1e-5, rtol=1e-5)
    s = torch.empty(4, device="cuda")
    torch.sum(a.cuda(), 0, out=s)
    compare(s.cpu(), a.sum(0), atol=1e-6, rtol=1e-6)


def test_out_argument_wrong_size_is_resized(remote):
    a, b = randn(3, 4), randn(3, 4, seed=1)
    c = torch.empty(5, device="cuda")
    torch.add(a.cuda(), b.cuda(), out=c)
    assert c.shape == (3, 4)
    compare(c.cpu(), a + b, exact=True)
    # zero-sized out (the usual "empty" out)
    e = torch.empty(0, device="cuda")
    torch.mul(a.cuda(), b.cuda(), out=e)
    assert e.shape == (3, 4)
    compare(e.cpu(), a * b, exact=True)
    # larger storage shrinks
    big = torch.empty(100, device="cuda")
    torch.sub(a.cuda(), b.cuda(), out=big)
    assert big.shape == (3, 4)
    compare(big.cpu(), a - b, exact=True)


def test_out_argument_values_and_indices(remote):
    x = randn(4, 5)
    values = torch.empty(0, device="cuda")
    indices = torch.empty(0, dtype=torch.long, device="cuda")
    torch.max(x.cuda(), 1, out=(values, indices))
    compare(values.cpu(), x.max(1).values, exact=True)
    compare(indices.cpu(), x.max(1).indices, exact=True)
    v2, i2 = torch.empty(0, device="cuda"), torch.empty(0, dtype=torch.long, device="cuda")
    torch.sort(x.cuda(), 1, out=(v2, i2))
    compare(v2.cpu(), x.sort(1).values, exact=True)
    compare(i2.cpu(), x.sort(1).indices, exact=True)


def test_out_argument_dtype_mismatch_raises(remote):
    c = torch.empty(3, dtype=torch.int64, device="cuda")
    with pytest.raises(RuntimeError, match="can't be cast"):
        torch.add(torch.ones(3, device="cuda"), 0.5, out=c)


def test_in_place_metadata_ops(remote):
    x = randn(3, 4)
    d = x.cuda()
    assert d.unsqueeze_(0) is d
    assert d.shape == (1, 3, 4)
    compare(d.cpu(), x.unsqueeze(0), exact=True)
    d.squeeze_(0)
    assert d.shape == (3, 4)
    compare(d.cpu(), x, exact=True)
    d.t_()
    assert d.shape == (4, 3) and d.stride() == (1, 4)
    compare(d.cpu(), x.t(), exact=True)
    d.t_()
    d.transpose_(0, 1)
    compare(d.cpu(), x.t(), exact=True)
    d.unsqueeze_(2).squeeze_()
    assert d.shape == (4, 3)
    d.as_strided_((2, 2), (1, 2))
    compare(d.cpu(), x.as_strided((2, 2), (1, 2)), exact=True)


def test_resize_(remote):
    x = torch.arange(12.0)
    d = x.cuda()
    d.resize_(3, 4)
    assert d.shape == (3, 4) and d.is_contiguous()
    compare(d.cpu(), x.view(3, 4), exact=True)
    d.resize_(2, 3)  # shrink keeps the leading elements
    compare(d.cpu(), x[:6].view(2, 3), exact=True)
    d.resize_(5, 5)  # grow: shape right, first 12 values kept
    assert d.shape == (5, 5)
    compare(d.cpu().flatten()[:12], x, exact=True)
    d.zero_()
    assert torch.equal(d.cpu(), torch.zeros(5, 5))
    e = torch.empty(0, device="cuda")
    e.resize_as_(d)
    assert e.shape == (5, 5)


def test_in_place_then_read_ordering(remote):
    d = torch.zeros(4, device="cuda")
    snapshot = d.clone()
    for i in range(10):
        d.add_(i)
    assert d.cpu().tolist() == [45.0] * 4
    assert snapshot.cpu().tolist() == [0.0] * 4
