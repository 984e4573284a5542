"""Elementwise ops, reductions and matrix multiplication through libremote, checked against plain local torch on the CPU.

Each test builds host tensors, computes the expected answer locally, computes the same with the
tensors on ``cuda`` (the libremote daemon), brings the result back with ``.cpu()`` and compares
(tests/op_checks.py). Split from tests/test_ops.py by subject; the numbered sections keep their
numbers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from op_checks import TOL, check, compare, randint, randn

# ==============================================================================================
# 1. Elementwise ops
# ==============================================================================================
UNARY = {
    "neg": torch.neg, "abs": torch.abs, "exp": torch.exp, "expm1": torch.expm1, "log1p": lambda x: torch.log1p(x.abs()),
    "log": lambda x: torch.log(x.abs() + 0.1), "sqrt": lambda x: torch.sqrt(x.abs()), "rsqrt": lambda x: torch.rsqrt(x.abs() + 0.1),
    "sin": torch.sin, "cos": torch.cos, "tan": torch.tan, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
    "erf": torch.erf, "floor": torch.floor, "ceil": torch.ceil, "round": torch.round, "trunc": torch.trunc,
    "sign": torch.sign, "reciprocal": lambda x: torch.reciprocal(x + 10), "relu": torch.relu,
    "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu, "softplus": F.softplus,
    "leaky_relu": lambda x: F.leaky_relu(x, 0.2), "elu": F.elu, "hardtanh": F.hardtanh, "mish": F.mish,
    "atan": torch.atan, "asin": lambda x: torch.asin(x.clamp(-1, 1)), "frac": torch.frac,
    "square": torch.square, "isnan": lambda x: torch.isnan(x / (x - x)), "isfinite": lambda x: torch.isfinite(1 / (x * 0)),
    "nan_to_num": lambda x: torch.nan_to_num(torch.log(x), nan=-1.0, neginf=-2.0),
    "round_decimals": lambda x: torch.round(x, decimals=2), "logit": lambda x: torch.logit(torch.sigmoid(x)),
}


@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary(remote, name):
    check(UNARY[name], randn(6, 7) * 3)


BINARY = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div,
    "add_alpha": lambda a, b: torch.add(a, b, alpha=0.5), "sub_alpha": lambda a, b: torch.sub(a, b, alpha=2),
    "maximum": torch.maximum, "minimum": torch.minimum, "atan2": torch.atan2, "hypot": torch.hypot,
    "fmod": torch.fmod, "remainder": torch.remainder, "floor_divide": torch.floor_divide,
    "div_floor": lambda a, b: torch.div(a, b, rounding_mode="floor"),
    "div_trunc": lambda a, b: torch.div(a, b, rounding_mode="trunc"),
    "copysign": torch.copysign, "lerp": lambda a, b: torch.lerp(a, b, 0.3),
    "xlogy": lambda a, b: torch.xlogy(a, b.abs()), "pow": lambda a, b: torch.pow(a.abs(), b),
}


@pytest.mark.parametrize("name", sorted(BINARY))
def test_binary_same_shape(remote, name):
    check(BINARY[name], randn(5, 4) * 3, randn(5, 4, seed=1) * 3 + 0.1)


@pytest.mark.parametrize(
    "shape_a,shape_b",
    [((4, 1), (1, 5)), ((3, 4, 5), (5,)), ((1,), (2, 3)), ((2, 1, 3), (4, 1)), ((), (3, 2)), ((6, 1, 1), (1, 1, 7))],
)
@pytest.mark.parametrize("op", ["add", "mul", "sub", "div", "maximum"])
def test_binary_broadcasting(remote, shape_a, shape_b, op):
    fn = getattr(torch, op)
    check(fn, randn(*shape_a), randn(*shape_b, seed=1) + 3)


@pytest.mark.parametrize(
    "dtype_a,dtype_b",
    [
        (torch.int64, torch.float32), (torch.int32, torch.float64), (torch.float32, torch.float64),
        (torch.bool, torch.float32), (torch.bool, torch.int64), (torch.uint8, torch.int8),
        (torch.int8, torch.int16), (torch.float16, torch.float32), (torch.bfloat16, torch.float16),
        (torch.int64, torch.bool), (torch.float32, torch.complex64),
    ],
)
@pytest.mark.parametrize("op", ["add", "mul"])
def test_type_promotion(remote, dtype_a, dtype_b, op):
    a = (randn(4, 3) * 5).to(dtype_a)
    b = (randn(4, 3, seed=1) * 5).to(dtype_b)
    got, expected = check(getattr(torch, op), a, b)
    assert got.dtype == torch.promote_types(dtype_a, dtype_b)


def test_int_true_division_promotes_to_float(remote):
    a = torch.tensor([7, -7, 9, 1])
    b = torch.tensor([2, 2, -4, 3])
    got, _ = check(torch.div, a, b)
    assert got.dtype == torch.float32
    got, _ = check(lambda x: x / 2, a)
    assert got.dtype == torch.float32


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: x + 2, lambda x: 2 + x, lambda x: x * 2.5, lambda x: 1 - x, lambda x: 3 / (x + 10),
        lambda x: x ** 2, lambda x: 2 ** x, lambda x: x > 0.5, lambda x: x + True, lambda x: x * (1 + 2j),
        lambda x: torch.add(x, 1, alpha=3),
    ],
    ids=["add", "radd", "mul_float", "rsub", "rdiv", "pow", "rpow", "gt", "add_bool", "mul_complex", "add_alpha"],
)
def test_python_scalar_operands(remote, fn):
    check(fn, randn(3, 4))


@pytest.mark.parametrize(
    "fn",
    [lambda x: x + 1, lambda x: x * 2.5, lambda x: x // 3, lambda x: x / 2, lambda x: x > 1],
    ids=["add_int", "mul_float", "floordiv", "truediv", "gt"],
)
def test_python_scalar_with_int_tensor_keeps_category(remote, fn):
    got, expected = check(fn, torch.arange(-5, 7).reshape(3, 4))
    assert got.dtype == expected.dtype


@pytest.mark.parametrize(
    "scalar",
    [torch.tensor(2.0), torch.tensor(3), torch.tensor(2.0, dtype=torch.float64), torch.tensor(True)],
    ids=["f32", "i64", "f64", "bool"],
)
@pytest.mark.parametrize("op", ["add", "mul", "sub", "maximum"])
def test_zero_dim_cpu_tensor_mixed_with_cuda(remote, scalar, op):
    if op == "sub" and scalar.dtype == torch.bool:
        pytest.skip("torch forbids subtracting bool tensors")
    x = randn(3, 4)
    fn = getattr(torch, op)
    expected = fn(x, scalar)
    got = fn(x.cuda(), scalar)  # the 0-dim CPU tensor stays on the host
    assert got.is_cuda
    compare(got.cpu(), expected)
    expected_r = fn(scalar, x)
    got_r = fn(scalar, x.cuda())
    assert got_r.is_cuda
    compare(got_r.cpu(), expected_r)


def test_zero_dim_cpu_tensor_operator_syntax(remote):
    x = randn(5)
    s = torch.tensor(2.0)
    compare((x.cuda() * s + s / x.cuda().abs().add(1)).cpu(), x * s + s / x.abs().add(1))
    xi = torch.arange(6)
    compare((xi.cuda() * torch.tensor(2.5)).cpu(), xi * torch.tensor(2.5))  # int tensor * 0-dim float -> float


def test_multi_dim_cpu_tensor_mixed_with_cuda_raises(remote):
    with pytest.raises(RuntimeError, match="same device|cuda:0 and cpu|cpu and cuda"):
        torch.ones(3, device="cuda") + torch.ones(3)


@pytest.mark.parametrize("op", ["eq", "ne", "lt", "le", "gt", "ge"])
def test_comparisons(remote, op):
    a = randint(0, 4, (5, 6)).float()
    b = randint(0, 4, (5, 6), seed=1).float()
    got, _ = check(getattr(torch, op), a, b, exact=True)
    assert got.dtype == torch.bool
    check(getattr(torch, op), a, 2, exact=True)
    check(getattr(torch, op), a, b[0], exact=True)  # broadcast


def test_logical_ops_and_isclose(remote):
    a = randint(0, 2, (4, 5)).bool()
    b = randint(0, 2, (4, 5), seed=1).bool()
    for fn in (torch.logical_and, torch.logical_or, torch.logical_xor):
        check(fn, a, b, exact=True)
    check(torch.logical_not, a, exact=True)
    x = randn(10)
    check(lambda u, v: torch.isclose(u, v, atol=0.5), x, x + 0.3 * randn(10, seed=2), exact=True)
    check(lambda u, v: torch.allclose(u, v), x, x.clone())


def test_where(remote):
    cond = randn(4, 5) > 0
    x, y = randn(4, 5, seed=1), randn(4, 5, seed=2)
    check(torch.where, cond, x, y, exact=True)
    check(lambda c, a: torch.where(c, a, 0.0), cond, x, exact=True)
    check(lambda c, a: torch.where(c, 1.0, a), cond, x, exact=True)
    check(lambda c, a, b: torch.where(c, a, b), cond[:, :1], x, y[0], exact=True)  # broadcast
    check(lambda c, a, b: torch.where(c, a, b), cond, x.double(), y, exact=True)  # promotion
    check(lambda a: a.where(a > 0, torch.tensor(-1.0)), x, exact=True)


def test_clamp(remote):
    x = randn(6, 6) * 4
    check(lambda t: torch.clamp(t, -1, 1), x, exact=True)
    check(lambda t: torch.clamp(t, min=0.5), x, exact=True)
    check(lambda t: torch.clamp(t, max=-0.5), x, exact=True)
    check(lambda t, lo, hi: torch.clamp(t, lo, hi), x, -randn(6, 6, seed=1).abs(), randn(6, 6, seed=2).abs(), exact=True)
    check(lambda t: t.clamp(min=torch.tensor(0.0)), x, exact=True)
    xi = torch.arange(-10, 10)
    check(lambda t: t.clamp(-3, 4), xi, exact=True)
    check(lambda t: t.clip(-3, 4), xi, exact=True)


def test_pow_variants(remote):
    x = randn(4, 4).abs() + 0.5
    check(lambda t: t.pow(3), x)
    check(lambda t: t.pow(0.5), x)
    check(lambda t: t.pow(-2), x)
    check(lambda t, e: t.pow(e), x, randn(4, 4, seed=1))
    check(lambda t: torch.pow(2.0, t), x)
    xi = torch.arange(-4, 5)
    check(lambda t: t.pow(3), xi, exact=True)
    check(lambda t: t.pow(2.0), xi)  # int ** float -> float
    check(lambda t, e: t ** e, xi, torch.arange(9).flip(0), exact=True)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int8], ids=str)
def test_integer_division_and_remainder(remote, dtype):
    a = torch.tensor([7, -7, 7, -7, 0, 13, -13, 5], dtype=dtype)
    b = torch.tensor([2, 2, -2, -2, 3, 4, 4, -3], dtype=dtype)
    check(torch.floor_divide, a, b, exact=True)
    check(lambda u, v: u // v, a, b, exact=True)
    check(lambda u, v: torch.div(u, v, rounding_mode="trunc"), a, b, exact=True)
    check(lambda u, v: torch.div(u, v, rounding_mode="floor"), a, b, exact=True)
    check(torch.remainder, a, b, exact=True)
    check(lambda u, v: u % v, a, b, exact=True)
    check(torch.fmod, a, b, exact=True)
    check(lambda u: u % 3, a, exact=True)
    check(lambda u: u // -3, a, exact=True)


def test_float_floor_divide_and_remainder(remote):
    a = torch.tensor([7.5, -7.5, 7.5, -7.5, 0.0, 1e-3])
    b = torch.tensor([2.0, 2.0, -2.0, -2.0, 3.0, -1.0])
    check(lambda u, v: u // v, a, b, exact=True)
    check(lambda u, v: u % v, a, b)
    check(torch.fmod, a, b)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.int16], ids=str)
def test_bitwise_ops(remote, dtype):
    a = randint(0, 100, (4, 6), dtype=dtype)
    b = randint(0, 100, (4, 6), dtype=dtype, seed=1)
    for fn in (torch.bitwise_and, torch.bitwise_or, torch.bitwise_xor):
        check(fn, a, b, exact=True)
    check(torch.bitwise_not, a, exact=True)
    check(lambda u, v: (u & v) | (u ^ 5), a, b, exact=True)
    check(lambda u: ~u, a, exact=True)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.int16], ids=str)
def test_bit_shifts(remote, dtype):
    a = randint(0, 100, (4, 6), dtype=dtype)
    b = randint(0, 4, (4, 6), dtype=dtype, seed=1)
    check(lambda u, v: torch.bitwise_left_shift(u, v), a, b, exact=True)
    check(lambda u, v: torch.bitwise_right_shift(u, v), a, b, exact=True)
    check(lambda u, v: u << v, a, b, exact=True)
    check(lambda u: u << 2, a, exact=True)
    check(lambda u: u >> 1, a, exact=True)


def test_bitwise_on_bool(remote):
    a = randn(8) > 0
    b = randn(8, seed=1) > 0
    check(lambda u, v: u & v, a, b, exact=True)
    check(lambda u, v: u | v, a, b, exact=True)
    check(lambda u, v: u ^ v, a, b, exact=True)
    check(lambda u: ~u, a, exact=True)


def test_ternary_pointwise(remote):
    a, b, c = randn(3, 4), randn(3, 4, seed=1), randn(3, 4, seed=2)
    check(lambda x, y, z: torch.addcmul(x, y, z, value=0.5), a, b, c)
    check(lambda x, y, z: torch.addcdiv(x, y, z.abs() + 1, value=2), a, b, c)
    check(lambda x, y, z: torch.lerp(x, y, z), a, b, c)


# ==============================================================================================
# 2. Reductions
# ==============================================================================================
REDUCTIONS = {
    "sum": lambda x: x.sum(), "sum_dim": lambda x: x.sum(1), "sum_dims": lambda x: x.sum((0, 2)),
    "sum_keepdim": lambda x: x.sum(-1, keepdim=True), "sum_dtype": lambda x: x.sum(dtype=torch.float64),
    "mean": lambda x: x.mean(), "mean_dim": lambda x: x.mean(0), "mean_keepdim": lambda x: x.mean((1, 2), keepdim=True),
    "prod": lambda x: x.prod(), "prod_dim": lambda x: x.prod(2), "prod_keepdim": lambda x: x.prod(1, keepdim=True),
    "amax": lambda x: x.amax(1), "amin": lambda x: x.amin((0, 1)), "max_all": lambda x: x.max(), "min_all": lambda x: x.min(),
    "argmax": lambda x: x.argmax(), "argmax_dim": lambda x: x.argmax(1), "argmin_keepdim": lambda x: x.argmin(2, keepdim=True),
    "std": lambda x: x.std(), "std_dim": lambda x: x.std(1), "std_unbiased_false": lambda x: x.std(0, unbiased=False),
    "var": lambda x: x.var(), "var_correction": lambda x: x.var(2, correction=0, keepdim=True),
    "var_mean": lambda x: torch.var_mean(x, 1), "std_mean": lambda x: torch.std_mean(x, (0, 2)),
    "norm": lambda x: x.norm(), "norm_p1": lambda x: x.norm(p=1, dim=1), "norm_inf": lambda x: x.norm(p=float("inf")),
    "linalg_vector_norm": lambda x: torch.linalg.vector_norm(x, ord=3, dim=(1, 2)),
    "fro_norm": lambda x: torch.linalg.matrix_norm(x), "cumsum": lambda x: x.cumsum(1), "cumprod": lambda x: x.cumprod(2),
    "cummax": lambda x: torch.cummax(x, 1), "logcumsumexp": lambda x: torch.logcumsumexp(x, 0),
    "logsumexp": lambda x: x.logsumexp(1), "logsumexp_keepdim": lambda x: torch.logsumexp(x, (0, 2), keepdim=True),
    "nansum": lambda x: torch.nansum(x), "count_nonzero": lambda x: torch.count_nonzero(x > 0, dim=1),
    "aminmax": lambda x: torch.aminmax(x, dim=0),
}


@pytest.mark.parametrize("name", sorted(REDUCTIONS))
def test_reductions(remote, name):
    check(REDUCTIONS[name], randn(3, 4, 5))


@pytest.mark.parametrize("op", ["max", "min"])
@pytest.mark.parametrize("keepdim", [False, True])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_max_min_with_dim_returns_values_and_indices(remote, op, keepdim, dim):
    x = randn(4, 5, 6)
    expected = getattr(x, op)(dim, keepdim=keepdim)
    got = getattr(x.cuda(), op)(dim, keepdim=keepdim)
    assert type(got).__name__ == type(expected).__name__
    assert got.values.is_cuda and got.indices.is_cuda
    compare(got.values.cpu(), expected.values, exact=True)
    compare(got.indices.cpu(), expected.indices, exact=True)
    values, indices = got
    compare(values.cpu(), expected[0], exact=True)
    assert indices.dtype == torch.int64


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool], ids=str)
def test_integer_and_bool_reductions(remote, dtype):
    x = randint(0, 3, (4, 5)).to(dtype)
    got, _ = check(lambda t: t.sum(), x, exact=True)
    assert got.dtype == torch.int64  # integral sums promote to int64
    check(lambda t: t.sum(0), x, exact=True)
    check(lambda t: t.max(), x, exact=True)
    if dtype != torch.bool:  # torch has no argmax/prod/cumsum... for bool
        check(lambda t: t.argmax(1), x, exact=True)
        check(lambda t: t.prod(1), x, exact=True)
        check(lambda t: t.cumsum(0), x, exact=True)


def test_all_any(remote):
    x = randn(4, 5) > -0.5
    check(torch.all, x, exact=True)
    check(torch.any, x, exact=True)
    check(lambda t: t.all(1), x, exact=True)
    check(lambda t: t.any(0, keepdim=True), x, exact=True)
    check(lambda t: t.all(), torch.ones(3, dtype=torch.bool), exact=True)
    check(lambda t: t.any(), torch.zeros(3, dtype=torch.bool), exact=True)
    check(lambda t: t.all(), randn(5), exact=True)  # float input -> bool
    check(lambda t: t.any(dim=(0, 1)), x, exact=True)


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("dim", [0, -1])
def test_topk(remote, largest, dim):
    x = randn(6, 7)
    check(lambda t: torch.topk(t, 3, dim=dim, largest=largest), x, exact=True)
    check(lambda t: t.topk(2, dim=dim, largest=largest, sorted=True).values, x, exact=True)


@pytest.mark.parametrize("descending", [False, True])
def test_sort_and_argsort(remote, descending):
    x = randn(5, 8)
    check(lambda t: torch.sort(t, dim=1, descending=descending), x, exact=True)
    check(lambda t: torch.sort(t, dim=0, descending=descending), x, exact=True)
    check(lambda t: t.argsort(dim=-1, descending=descending), x, exact=True)
    ties = torch.tensor([3, 1, 2, 1, 3, 2, 1, 3])
    check(lambda t: torch.sort(t, stable=True, descending=descending), ties, exact=True)
    check(lambda t: torch.msort(t), x, exact=True)


def test_kthvalue_and_median(remote):
    x = randn(5, 7)
    check(lambda t: torch.kthvalue(t, 3, dim=1), x, exact=True)
    check(lambda t: torch.kthvalue(t, 2, dim=0, keepdim=True), x, exact=True)
    check(torch.median, x, exact=True)
    check(lambda t: torch.median(t, dim=1), x, exact=True)
    check(lambda t: torch.nanmedian(t, dim=0), x, exact=True)
    check(lambda t: torch.quantile(t, 0.3, dim=1), x)
    check(lambda t: torch.mode(t, dim=1), randint(0, 3, (4, 9)), exact=True)


def test_reduction_results_usable_as_python_numbers(remote):
    x = randn(10)
    assert x.cuda().sum().item() == pytest.approx(x.sum().item(), rel=1e-5)
    assert int(x.cuda().argmax()) == int(x.argmax())
    assert bool((x.cuda() > 0).all()) == bool((x > 0).all())


# ==============================================================================================
# 3. Matrix multiplication
# ==============================================================================================
MATMULS = {
    "matmul_2d": (lambda a, b: a @ b, [(5, 7), (7, 3)]),
    "matmul_batched_broadcast": (torch.matmul, [(2, 5, 7), (7, 4)]),
    "matmul_vec": (torch.matmul, [(5, 7), (7,)]),
    "matmul_vec_vec": (torch.matmul, [(7,), (7,)]),
    "matmul_4d": (torch.matmul, [(2, 1, 4, 6), (3, 6, 2)]),
    "mm": (torch.mm, [(4, 6), (6, 5)]),
    "mm_transposed": (lambda a, b: torch.mm(a.t(), b.t()), [(6, 4), (5, 6)]),
    "bmm": (torch.bmm, [(3, 4, 6), (3, 6, 2)]),
    "mv": (torch.mv, [(4, 6), (6,)]),
    "dot": (torch.dot, [(9,), (9,)]),
    "outer": (torch.outer, [(4,), (5,)]),
    "einsum_ij_jk": (lambda a, b: torch.einsum("ij,jk->ik", a, b), [(4, 6), (6, 3)]),
    "einsum_batch": (lambda a, b: torch.einsum("bij,bkj->bik", a, b), [(2, 4, 6), (2, 3, 6)]),
    "einsum_trace": (lambda a: torch.einsum("ii->", a), [(5, 5)]),
    "einsum_outer": (lambda a, b: torch.einsum("i,j->ij", a, b), [(3,), (4,)]),
    "einsum_attention": (lambda q, k: torch.einsum("bhqd,bhkd->bhqk", q, k), [(2, 3, 4, 8), (2, 3, 5, 8)]),
    "addmm": (lambda c, a, b: torch.addmm(c, a, b), [(4, 5), (4, 6), (6, 5)]),
    "addmm_beta_alpha_bcast": (lambda c, a, b: torch.addmm(c, a, b, beta=0.5, alpha=2.0), [(5,), (4, 6), (6, 5)]),
    "baddbmm": (lambda c, a, b: torch.baddbmm(c, a, b), [(3, 4, 5), (3, 4, 6), (3, 6, 5)]),
    "baddbmm_beta_alpha": (lambda c, a, b: torch.baddbmm(c, a, b, beta=0.25, alpha=-1.5), [(3, 4, 5), (3, 4, 6), (3, 6, 5)]),
    "addmv": (torch.addmv, [(4,), (4, 6), (6,)]),
    "linear": (F.linear, [(3, 6), (5, 6), (5,)]),
    "linear_no_bias": (F.linear, [(2, 3, 6), (5, 6)]),
    "bilinear": (F.bilinear, [(3, 4), (3, 5), (6, 4, 5), (6,)]),
    "tensordot": (lambda a, b: torch.tensordot(a, b, dims=([1, 2], [0, 1])), [(3, 4, 5), (4, 5, 2)]),
    "kron": (torch.kron, [(2, 3), (3, 2)]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", sorted(MATMULS))
def test_matmul_family(remote, name, dtype):
    fn, shapes = MATMULS[name]
    args = [randn(*shape, seed=i).to(dtype) for i, shape in enumerate(shapes)]
    check(fn, *args, **TOL[dtype])


def test_integer_matmul(remote):
    a, b = randint(-5, 5, (4, 6)), randint(-5, 5, (6, 3), seed=1)
    check(torch.matmul, a, b, exact=True)


def test_matmul_shape_error_raises(remote):
    with pytest.raises(RuntimeError, match="cannot be multiplied|size mismatch|shapes"):
        torch.ones(3, 4, device="cuda") @ torch.ones(5, 2, device="cuda")


def test_linalg_basics(remote):
    a = randn(4, 4, dtype=torch.float64) + 4 * torch.eye(4, dtype=torch.float64)
    check(torch.linalg.inv, a)
    check(torch.linalg.det, a)
    check(lambda m, b: torch.linalg.solve(m, b), a, randn(4, 2, dtype=torch.float64))
    spd = a @ a.T
    check(torch.linalg.cholesky, spd)
    check(torch.trace, a)
    check(lambda m: torch.diagonal(m, offset=1), a, exact=True)
    check(torch.triu, a, exact=True)
    check(lambda m: torch.tril(m, -1), a, exact=True)
