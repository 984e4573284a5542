"""Explicit device generators: ``torch.Generator("cuda")`` as on CUDA.

diffusers pipelines are called with ``generator=torch.Generator("cuda").manual_seed(0)`` and timm's
``ModelEmaV3`` builds one even when unused; a CPU build of torch refuses to make one. Under
libremote it is a generator in the session on the daemon: seeded, saved and restored like CUDA's,
drawn from by every random op given it, and dropped when the program lets go of it. Its numbers
equal the default generator's seeded the same way, and on a CPU daemon those of a local CPU
generator. Where CUDA raises (a host op given a device generator, a DataLoader given one, a device
op given a host generator), so does libremote.
"""

from __future__ import annotations

import copy
import gc
import io
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

from libremote_wire import codec
from libremote_wire.messages import Cmd, Msg

from raw_client import RawClient

#: Whether the daemon computes on the CPU, where its random numbers equal local CPU torch's.
CPU_DAEMON = os.environ.get("LIBREMOTE_TEST_DEVICE", "cpu") == "cpu"

CUDA_HOST_OP_ERROR = "Expected a 'cpu' device type for generator but found 'cuda'"
CUDA_DEVICE_OP_ERROR = "Expected a 'cuda' device type for generator but found 'cpu'"


def host_ones(*shape: int) -> torch.Tensor:
    return torch.ones(*shape)


#: Random ops that take ``generator=``, each given a device and a generator (None: the default).
RANDOM_OPS: dict[str, Callable[[str, Any], torch.Tensor]] = {
    "randn": lambda d, g: torch.randn(3, 4, device=d, generator=g),
    "rand": lambda d, g: torch.rand(5, device=d, generator=g),
    "rand float64": lambda d, g: torch.rand(5, dtype=torch.float64, device=d, generator=g),
    "randint": lambda d, g: torch.randint(0, 100, (6,), device=d, generator=g),
    "randint low": lambda d, g: torch.randint(-5, 5, (2, 3), device=d, generator=g),
    "randperm": lambda d, g: torch.randperm(12, device=d, generator=g),
    "normal (tensor mean)": lambda d, g: torch.normal(torch.zeros(4, device=d), 2.0, generator=g),
    "normal (float, float)": lambda d, g: torch.normal(1.0, 3.0, (4,), device=d, generator=g),
    "normal_": lambda d, g: torch.zeros(5, device=d).normal_(2.0, 0.5, generator=g),
    "uniform_": lambda d, g: torch.zeros(5, device=d).uniform_(-1, 1, generator=g),
    "exponential_": lambda d, g: torch.zeros(5, device=d).exponential_(generator=g),
    "geometric_": lambda d, g: torch.zeros(5, device=d).geometric_(0.3, generator=g),
    "cauchy_": lambda d, g: torch.zeros(5, device=d).cauchy_(generator=g),
    "log_normal_": lambda d, g: torch.zeros(5, device=d).log_normal_(generator=g),
    "random_": lambda d, g: torch.zeros(5, device=d).random_(0, 50, generator=g),
    "bernoulli": lambda d, g: torch.bernoulli(torch.full((16,), 0.4, device=d), generator=g),
    "bernoulli p": lambda d, g: torch.bernoulli(torch.zeros(16, device=d), 0.7, generator=g),
    "bernoulli_ (a dropout mask)": lambda d, g: torch.empty(16, device=d).bernoulli_(0.5, generator=g),
    "multinomial": lambda d, g: torch.multinomial(torch.tensor([0.1, 0.2, 0.3, 0.4], device=d), 8, True, generator=g),
    "poisson": lambda d, g: torch.poisson(torch.full((6,), 4.0, device=d), generator=g),
    "binomial": lambda d, g: torch.binomial(torch.full((4,), 10.0, device=d), torch.full((4,), 0.5, device=d), generator=g),
    "_standard_gamma": lambda d, g: torch._standard_gamma(torch.ones(4, device=d), generator=g),
    "randn_like": lambda d, g: torch.randn_like(torch.zeros(2, 3, device=d), generator=g),
    "rand_like": lambda d, g: torch.rand_like(torch.zeros(4, device=d), generator=g),
    "randint_like": lambda d, g: torch.randint_like(torch.zeros(4, device=d), 10, generator=g),
    "nn.init.normal_": lambda d, g: torch.nn.init.normal_(torch.empty(3, 3, device=d), generator=g),
    "nn.init.trunc_normal_": lambda d, g: torch.nn.init.trunc_normal_(torch.empty(3, 3, device=d), generator=g),
}


@pytest.mark.parametrize("name", list(RANDOM_OPS))
def test_random_ops_draw_from_the_generator_they_are_given(remote, name):
    op = RANDOM_OPS[name]
    torch.cuda.manual_seed(1234)
    from_default = op("cuda", None).cpu()
    generator = torch.Generator("cuda").manual_seed(1234)
    first = op("cuda", generator).cpu()
    second = op("cuda", generator).cpu()
    assert torch.equal(first, from_default), "a generator seeded like the default draws what the default draws"
    assert not torch.equal(first, second) or first.numel() == 0 or name.startswith("bernoulli p")
    if CPU_DAEMON:
        local = torch.Generator().manual_seed(1234)
        assert torch.equal(first, op("cpu", local)), "on a CPU daemon: local CPU torch's numbers"
        assert torch.equal(second, op("cpu", local))


def test_device_generators_are_made_as_on_cuda(remote):
    for generator, device in [
        (torch.Generator("cuda"), torch.device("cuda")),
        (torch.Generator(device="cuda:0"), torch.device("cuda", 0)),
        (torch.Generator(device=torch.device("cuda")), torch.device("cuda")),
        (torch.Generator(torch.device("cuda", 0)), torch.device("cuda", 0)),
    ]:
        assert generator.device == device
        assert isinstance(generator, torch.Generator) and isinstance(generator, torch._C.Generator)
        assert generator.initial_seed() == torch.Generator().initial_seed()  # torch's default seed
    host = torch.Generator()
    assert type(host) is torch._C.Generator and host.device == torch.device("cpu")
    assert torch.Generator(device="cpu").device == torch.device("cpu")
    assert isinstance(torch.default_generator, torch.Generator)

    class ProgramsOwn(torch.Generator):  # a subclass made while libremote is active: torch's own
        pass

    own = ProgramsOwn()
    assert type(own) is ProgramsOwn and own.device == torch.device("cpu") and torch.rand(2, generator=own).shape == (2,)

    generator = torch.Generator("cuda")
    assert generator.manual_seed(7) is generator and generator.initial_seed() == 7
    assert generator.manual_seed(-1).initial_seed() == 2**64 - 1  # as torch wraps negative seeds
    with pytest.raises(RuntimeError, match="manual_seed expected a long"):
        generator.manual_seed(1.5)
    seed = generator.seed()
    assert isinstance(seed, int) and seed == generator.initial_seed()
    # A fresh generator starts from the default seed: the same numbers as another fresh one.
    assert torch.equal(torch.rand(4, device="cuda", generator=torch.Generator("cuda")).cpu(),
                       torch.rand(4, device="cuda", generator=torch.Generator("cuda")).cpu())
    # The unused generator timm's ModelEmaV3 builds, and diffusers' idiom.
    diffusers_style = torch.Generator("cuda").manual_seed(0)
    assert torch.randn(2, 2, device="cuda", generator=diffusers_style).shape == (2, 2)


def test_generators_are_independent_of_the_default_and_of_each_other(remote):
    torch.cuda.manual_seed(3)
    expected = torch.rand(6, device="cuda").cpu()
    torch.cuda.manual_seed(3)
    a, b = torch.Generator("cuda").manual_seed(3), torch.Generator("cuda").manual_seed(3)
    from_a = torch.rand(6, device="cuda", generator=a).cpu()
    torch.manual_seed(99)  # reseeding the default generators leaves explicit ones alone
    from_b = torch.rand(6, device="cuda", generator=b).cpu()
    torch.cuda.manual_seed(3)
    assert torch.equal(torch.rand(6, device="cuda").cpu(), expected)
    assert torch.equal(from_a, expected) and torch.equal(from_b, expected)


def test_state_can_be_saved_and_restored(remote):
    generator = torch.Generator("cuda").manual_seed(11)
    state = generator.get_state()
    assert type(state) is torch.Tensor and state.dtype == torch.uint8 and state.device.type == "cpu"
    if CPU_DAEMON:
        assert torch.equal(state, torch.Generator().manual_seed(11).get_state())
    first = torch.randn(8, device="cuda", generator=generator).cpu()
    assert generator.set_state(state) is generator
    assert torch.equal(torch.randn(8, device="cuda", generator=generator).cpu(), first)
    assert torch.equal(generator.get_state(), generator.get_state())  # reading it draws nothing

    other = torch.Generator("cuda").manual_seed(5)
    other.set_state(state)  # a state carries its seed
    assert other.initial_seed() == 11
    assert torch.equal(torch.randn(8, device="cuda", generator=other).cpu(), first)

    generator.set_state(state)
    clone = generator.clone_state()
    assert type(clone) is type(generator) and clone is not generator and clone.device == generator.device
    assert torch.equal(torch.rand(3, device="cuda", generator=clone).cpu(),
                       torch.rand(3, device="cuda", generator=generator).cpu())

    with pytest.raises(TypeError, match="expected a torch.ByteTensor, but got list"):
        generator.set_state([1, 2])
    with pytest.raises(TypeError, match="RNG state must be a torch.ByteTensor"):
        generator.set_state(torch.zeros(3))
    with pytest.raises(RuntimeError, match="size"):
        generator.set_state(torch.zeros(3, dtype=torch.uint8))
    assert torch.randn(2, device="cuda", generator=generator).shape == (2,)  # still usable


def test_copies_and_checkpoints_carry_the_state(remote):
    generator = torch.Generator("cuda").manual_seed(21)
    torch.rand(5, device="cuda", generator=generator)
    copied = copy.deepcopy(generator)
    buffer = io.BytesIO()
    torch.save({"generator": generator}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)["generator"]
    expected = torch.rand(4, device="cuda", generator=generator).cpu()
    for other in (copied, loaded):
        assert type(other) is type(generator) and other.device == generator.device
        assert other.initial_seed() == 21
        assert torch.equal(torch.rand(4, device="cuda", generator=other).cpu(), expected)


def test_where_cuda_refuses_a_generator_so_does_libremote(remote):
    generator = torch.Generator("cuda").manual_seed(0)
    host = torch.zeros(4)
    with pytest.raises(RuntimeError, match=CUDA_HOST_OP_ERROR):
        torch.randn(3, generator=generator)
    with pytest.raises(RuntimeError, match=CUDA_HOST_OP_ERROR):
        host.normal_(generator=generator)
    assert torch.equal(host, torch.zeros(4)), "nothing was drawn"
    with pytest.raises(RuntimeError, match=CUDA_HOST_OP_ERROR):
        torch.randperm(5, generator=generator)
    with pytest.raises(RuntimeError, match=CUDA_DEVICE_OP_ERROR):
        torch.randn(3, device="cuda", generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match=CUDA_DEVICE_OP_ERROR):
        torch.zeros(3, device="cuda").uniform_(generator=torch.Generator())

    # torch's DataLoader draws its base seed on the host with the loader's generator, so on CUDA
    # a device generator fails at iter(), shuffled or not; random_split draws on the host too.
    dataset = torch.utils.data.TensorDataset(torch.arange(10))
    for shuffle in (True, False):
        loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=shuffle, generator=generator)
        with pytest.raises(RuntimeError, match=CUDA_HOST_OP_ERROR):
            iter(loader)
    with pytest.raises(RuntimeError, match=CUDA_HOST_OP_ERROR):
        torch.utils.data.random_split(dataset, [5, 5], generator=generator)
    # ... while the device generator keeps working where CUDA's does.
    assert torch.rand(2, device="cuda", generator=generator).shape == (2,)


def test_the_daemon_drops_generators_the_program_lets_go_of(remote):
    before = remote.session_stats()["generators"]
    generators = [torch.Generator("cuda").manual_seed(i) for i in range(6)]
    torch.rand(1, device="cuda", generator=generators[0]).cpu()
    assert remote.session_stats()["generators"] == before + 6
    del generators
    gc.collect()
    assert remote.session_stats()["generators"] == before


def test_an_explicit_generator_in_a_captured_step_advances_per_replay(remote):
    if not CPU_DAEMON:
        pytest.skip("compares with local CPU torch's numbers")
    generator = torch.Generator("cuda").manual_seed(2)
    local = torch.Generator().manual_seed(2)
    x = torch.zeros(4, device="cuda")
    step = remote.capture_step(lambda x: x + torch.rand(4, device="cuda", generator=generator), x)
    replays = [step(x).cpu().clone() for _ in range(3)]
    expected = [torch.rand(4, generator=local) for _ in range(5)]  # warm-up and recording ran it twice
    for got, want in zip(replays, expected[2:]):
        assert torch.equal(got, want)


# ------------------------------------------------------------------------------------------------
# The daemon's side: generator ids are checked like handles, and bounded per session
# ------------------------------------------------------------------------------------------------
def test_generator_ids_are_checked_like_handles(daemon):
    rand = [1, "aten::rand.generator"]
    on_device = {"device": codec.device_ext(0)}
    with RawClient(daemon.address) as raw, RawClient(daemon.address) as other:
        assert raw.hello()[0] == Msg.WELCOME and other.hello()[0] == Msg.WELCOME
        assert "generators" in raw.welcome["features"]
        _, error, _ = raw.call([[Cmd.GENERATOR, 5, 0], [Cmd.SEED, 42, codec.generator_ext(5)],
                                [Cmd.OP, rand, [[3]], {"generator": codec.generator_ext(5), **on_device}, [1]]])
        assert error is None, error
        local = torch.rand(3, generator=torch.Generator().manual_seed(42))
        if CPU_DAEMON:
            assert torch.equal(raw.fetch(1), local)
        # Another session does not see it; an unknown id is an error that names it.
        _, error, _ = other.call([[Cmd.OP, rand, [[3]], {"generator": codec.generator_ext(5), **on_device}, [1]]])
        assert error is not None and error[0] == "handle" and "generator 5" in error[2], error
        for command in ([Cmd.SEED, 1, codec.generator_ext(6)], [Cmd.RNG_STATE, codec.generator_ext(6)]):
            _, error, _ = raw.call([command])
            assert error is not None and error[0] == "handle" and "generator 6" in error[2], error
        for bad in (["GENERATOR", 7, 0], [Cmd.GENERATOR, -1, 0], [Cmd.GENERATOR, "7", 0], [Cmd.GENERATOR, True, 0],
                    [Cmd.GENERATOR, 5, 0], [Cmd.GENERATOR], [Cmd.GENERATOR, 8, 0, 0]):
            _, error, _ = raw.call([bad])
            assert error is not None and error[0] == "protocol", (bad, error)
        _, error, _ = raw.call([[Cmd.GENERATOR, 9, 3]])  # a device the session does not have
        assert error is not None and "does not exist" in error[2], error
        _, error, _ = raw.call([[Cmd.RNG_STATE, codec.generator_ext(5), b"\x00\x01"]])
        assert error is not None and "size" in error[2], error
        # Dropping is idempotent, and the dropped id is unknown from then on.
        _, error, _ = raw.call([[Cmd.GENERATOR, 5], [Cmd.GENERATOR, 5], [Cmd.GENERATOR, 12345]])
        assert error is None, error
        _, error, _ = raw.call([[Cmd.RNG_STATE, codec.generator_ext(5)]])
        assert error is not None and error[0] == "handle", error
        # A generator where a tensor belongs fails that op only.
        _, error, _ = raw.call([[Cmd.GENERATOR, 10, 0],
                                [Cmd.OP, [2, "aten::neg"], [codec.generator_ext(10)], {}, [2]]])
        assert error is not None and error[0] == "op", error
        assert raw.fetch(1).shape == (3,)


def test_generators_per_session_are_capped(daemon):
    from libremote_server import limits

    with RawClient(daemon.address) as raw:
        assert raw.hello()[0] == Msg.WELCOME
        _, error, _ = raw.call([[Cmd.GENERATOR, index, 0] for index in range(limits.MAX_GENERATORS)])
        assert error is None, error
        _, error, _ = raw.call([[Cmd.GENERATOR, limits.MAX_GENERATORS, 0]])
        assert error is not None and error[0] == "oom" and "generators" in error[2], error
        _, error, _ = raw.call([[Cmd.GENERATOR, 0], [Cmd.GENERATOR, limits.MAX_GENERATORS, 0],
                                [Cmd.SEED, 1, codec.generator_ext(limits.MAX_GENERATORS)]])
        assert error is None, error  # room again
