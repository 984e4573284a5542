"""Random ops through libremote (seeded like local torch), checked against plain local torch on the CPU.

Each test builds host tensors, computes the expected answer locally, computes the same with the
tensors on ``cuda`` (the libremote daemon), brings the result back with ``.cpu()`` and compares
(tests/op_checks.py). Split from tests/test_ops.py by subject; the numbered sections keep their
numbers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from op_checks import randn

# ==============================================================================================
# 9. Random ops
# ==============================================================================================
RANDOM = {
    "randn": lambda: torch.randn(50, device="cuda"),
    "rand": lambda: torch.rand(4, 5, device="cuda"),
    "randint": lambda: torch.randint(0, 100, (30,), device="cuda"),
    "randperm": lambda: torch.randperm(20, device="cuda"),
    "normal_": lambda: torch.empty(40, device="cuda").normal_(2.0, 0.5),
    "uniform_": lambda: torch.empty(40, device="cuda").uniform_(-3, 3),
    "bernoulli": lambda: torch.bernoulli(torch.full((40,), 0.3, device="cuda")),
    "bernoulli_p": lambda: torch.empty(40, device="cuda").bernoulli_(0.6),
    "multinomial": lambda: torch.multinomial(torch.tensor([0.1, 0.2, 0.3, 0.4], device="cuda"), 20, replacement=True),
    "multinomial_no_replacement": lambda: torch.multinomial(torch.ones(30, device="cuda"), 10),
    "normal_fn": lambda: torch.normal(torch.zeros(20, device="cuda"), torch.ones(20, device="cuda")),
    "exponential_": lambda: torch.empty(20, device="cuda").exponential_(),
    "randn_like": lambda: torch.randn_like(torch.zeros(3, 3, device="cuda")),
    "dropout_train": lambda: F.dropout(torch.ones(100, device="cuda"), 0.5, training=True),
}


@pytest.mark.parametrize("name", sorted(RANDOM))
def test_random_same_seed_same_values(remote, name):
    torch.cuda.manual_seed(1234)
    first = RANDOM[name]().cpu()
    torch.cuda.manual_seed(1234)
    second = RANDOM[name]().cpu()
    assert torch.equal(first, second)
    torch.cuda.manual_seed(99)
    third = RANDOM[name]().cpu()
    assert not torch.equal(first, third)
    # successive draws without reseeding differ
    torch.cuda.manual_seed(1234)
    a = RANDOM[name]().cpu()
    b = RANDOM[name]().cpu()
    assert not torch.equal(a, b)


def test_torch_manual_seed_also_seeds_device(remote):
    torch.manual_seed(7)
    a = torch.randn(30, device="cuda").cpu()
    torch.manual_seed(7)
    b = torch.randn(30, device="cuda").cpu()
    torch.manual_seed(8)
    c = torch.randn(30, device="cuda").cpu()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_cuda_seed_matches_local_cpu_generator(remote):
    torch.cuda.manual_seed(2024)
    got = torch.randn(100, device="cuda").cpu()
    torch.manual_seed(2024)
    expected = torch.randn(100)
    assert torch.equal(got, expected)


def test_cuda_seed_matches_local_cpu_generator_rand_and_randint(remote):
    torch.cuda.manual_seed(5)
    got_rand = torch.rand(10, device="cuda").cpu()
    got_int = torch.randint(0, 1000, (10,), device="cuda").cpu()
    torch.manual_seed(5)
    assert torch.equal(got_rand, torch.rand(10))
    assert torch.equal(got_int, torch.randint(0, 1000, (10,)))


def test_local_cpu_draws_do_not_disturb_device_stream(remote):
    torch.cuda.manual_seed(11)
    a1 = torch.randn(10, device="cuda").cpu()
    a2 = torch.randn(10, device="cuda").cpu()
    torch.cuda.manual_seed(11)
    b1 = torch.randn(10, device="cuda").cpu()
    torch.randn(1000)  # host generator use in between
    b2 = torch.randn(10, device="cuda").cpu()
    assert torch.equal(a1, b1) and torch.equal(a2, b2)


def test_rng_state_get_set(remote):
    torch.cuda.manual_seed(3)
    state = torch.cuda.get_rng_state()
    assert state.device.type == "cpu" and state.dtype == torch.uint8
    a = torch.rand(10, device="cuda").cpu()
    torch.cuda.set_rng_state(state)
    b = torch.rand(10, device="cuda").cpu()
    assert torch.equal(a, b)
    assert torch.cuda.initial_seed() == 3


def test_random_distributions_are_plausible(remote):
    torch.cuda.manual_seed(0)
    n = torch.randn(20000, device="cuda")
    assert abs(n.mean().item()) < 0.05 and abs(n.std().item() - 1) < 0.05
    u = torch.rand(20000, device="cuda")
    assert 0 <= u.min().item() and u.max().item() < 1 and abs(u.mean().item() - 0.5) < 0.02
    r = torch.randint(3, 8, (5000,), device="cuda")
    assert r.min().item() == 3 and r.max().item() == 7 and r.dtype == torch.int64
    p = torch.randperm(50, device="cuda").cpu()
    assert torch.equal(p.sort().values, torch.arange(50))
    m = torch.empty(20000, device="cuda").normal_(2.0, 0.5)
    assert abs(m.mean().item() - 2.0) < 0.02 and abs(m.std().item() - 0.5) < 0.02
    uu = torch.empty(20000, device="cuda").uniform_(-3, 3)
    assert -3 <= uu.min().item() and uu.max().item() <= 3
    b = torch.bernoulli(torch.full((20000,), 0.3, device="cuda"))
    assert set(b.unique().cpu().tolist()) <= {0.0, 1.0} and abs(b.mean().item() - 0.3) < 0.02
    probs = torch.tensor([0.0, 0.2, 0.8], device="cuda")
    draws = torch.multinomial(probs, 5000, replacement=True).cpu()
    assert (draws != 0).all() and abs((draws == 2).float().mean().item() - 0.8) < 0.03
    no_rep = torch.multinomial(torch.ones(10, device="cuda"), 10).cpu()
    assert torch.equal(no_rep.sort().values, torch.arange(10))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropout_training(remote, p):
    x = torch.ones(200, 100, device="cuda")
    torch.cuda.manual_seed(42)
    a = F.dropout(x, p, training=True).cpu()
    torch.cuda.manual_seed(42)
    b = F.dropout(x, p, training=True).cpu()
    assert torch.equal(a, b)
    zeros = (a == 0).float().mean().item()
    assert abs(zeros - p) < 0.02
    kept = a[a != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - p)))
    module = torch.nn.Dropout(p).train()
    torch.cuda.manual_seed(42)
    c = module(x).cpu()
    assert torch.equal(a, c)


def test_dropout_training_matches_local_with_same_seed(remote):
    x = randn(50, 40)
    torch.cuda.manual_seed(17)
    got = F.dropout(x.cuda(), 0.3, training=True).cpu()
    torch.manual_seed(17)
    expected = F.dropout(x, 0.3, training=True)
    assert torch.equal(got, expected)


def test_explicit_generator_is_refused_clearly(remote):
    g = torch.Generator().manual_seed(0)
    with pytest.raises((NotImplementedError, RuntimeError)):
        torch.randn(3, device="cuda", generator=g).cpu()
