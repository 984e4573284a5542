"""Helpers for the op tests (tests/test_ops_*.py): run a function on host tensors and on ``cuda``
copies of them (the libremote daemon's device), bring the result back and compare.

``check(fn, *args)`` is the usual test: it computes the expected answer with plain local torch
on the CPU, the same with the tensors on ``cuda``, and compares shape, dtype and values.
"""

from __future__ import annotations

import torch

CUDA = torch.device("cuda", 0)


def to_dev(value):
    """Host tensors (and tensors in lists/tuples/dicts) -> cuda copies; other values unchanged."""
    if isinstance(value, torch.Tensor):
        return value.cuda()
    if isinstance(value, (list, tuple)):
        return type(value)(to_dev(v) for v in value)
    if isinstance(value, dict):
        return {k: to_dev(v) for k, v in value.items()}
    return value


def to_host(value):
    """cuda results (possibly nested, or named tuples such as torch.return_types) -> CPU."""
    if isinstance(value, torch.Tensor):
        assert value.is_cuda, f"expected a cuda result, got a tensor on {value.device}"
        return value.cpu()
    if isinstance(value, tuple) and hasattr(value, "_fields") or type(value).__module__ == "torch.return_types":
        return tuple(to_host(v) for v in value)
    if isinstance(value, (list, tuple)):
        return type(value)(to_host(v) for v in value)
    return value


def normalize(value):
    if type(value).__module__ == "torch.return_types":
        return tuple(value)
    if isinstance(value, (list, tuple)):
        return type(value)(normalize(v) for v in value)
    return value


def check(fn, *args, exact=False, atol=None, rtol=None, **kwargs):
    """Run ``fn`` on host args and on cuda copies; compare results (shape, dtype, values)."""
    # Upload first: ``fn`` may mutate its (host) arguments in place.
    dev_args, dev_kwargs = to_dev(args), to_dev(kwargs)
    expected = normalize(fn(*args, **kwargs))
    got = normalize(to_host(fn(*dev_args, **dev_kwargs)))
    compare(got, expected, exact=exact, atol=atol, rtol=rtol)
    return got, expected


def compare(got, expected, exact=False, atol=None, rtol=None):
    if isinstance(expected, (list, tuple)):
        assert isinstance(got, (list, tuple)), f"expected a sequence, got {type(got)}"
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            compare(g, e, exact=exact, atol=atol, rtol=rtol)
        return
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"expected a tensor, got {type(got)}"
        assert got.device.type == "cpu"
        assert got.dtype == expected.dtype, f"dtype {got.dtype} != {expected.dtype}"
        assert got.shape == expected.shape, f"shape {tuple(got.shape)} != {tuple(expected.shape)}"
        # A misaligned complex128 host tensor segfaults torch's vectorized CPU kernels: fail here
        # instead of taking the test process down (test_fetched_tensor_is_aligned covers all dtypes).
        assert got.dtype != torch.complex128 or got.numel() == 0 or got.data_ptr() % got.element_size() == 0, (
            f"fetched {got.dtype} tensor is misaligned: data_ptr % {got.element_size()} == "
            f"{got.data_ptr() % got.element_size()}"
        )
        if exact:
            assert torch.equal(got, expected), f"values differ:\n{got}\n!=\n{expected}"
        else:
            torch.testing.assert_close(got, expected, atol=atol, rtol=rtol, equal_nan=True)
        return
    assert got == expected


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(shape, generator=gen(seed), dtype=dtype)


def randint(low, high, shape, dtype=torch.int64, seed=0):
    return torch.randint(low, high, shape, generator=gen(seed), dtype=dtype)


#: Tolerances of matmul-like results (matmuls, convolutions) per dtype.
TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.bfloat16: dict(atol=5e-2, rtol=2e-2),
}
