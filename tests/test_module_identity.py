"""Moving a module keeps its Parameter objects, as on CUDA (libremote/client/parameter_identity.py).

On CUDA, ``model.cuda()``/``.to("cuda")``/``.cpu()`` rebind each parameter in place, so tied
weights stay tied and an optimizer created before the move trains the model. Each test compares
with what CUDA does (torch's ``Module._apply``) and, where numbers are involved, with the same
program on local CPU torch.
"""

from __future__ import annotations

import copy
import warnings
import weakref

import pytest
import torch
from torch import nn

from libremote.client.tensor import RemoteTensor

RTOL = 1e-4
ATOL = 1e-5


class TiedLM(nn.Module):
    """A tiny language model whose output layer shares the embedding's weight (GPT-2's tie)."""

    def __init__(self, vocab: int = 11, width: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.norm = nn.BatchNorm1d(width)
        self.hidden = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(self.norm(self.embed(tokens)))))


def tied_model(seed: int = 0) -> TiedLM:
    torch.manual_seed(seed)
    return TiedLM()


def tokens(seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 11, (16,), generator=generator)


def assert_remote(tensor: torch.Tensor) -> None:
    assert isinstance(tensor, RemoteTensor), type(tensor)
    assert tensor.device == torch.device("cuda", 0)


def parameter_ids(model: nn.Module) -> list[int]:
    return [id(param) for param in model.parameters()]


def test_parameters_keep_their_objects_through_moves_and_casts(remote):
    model = tied_model()
    ids = parameter_ids(model)
    model.hidden.weight.note = "set by the program"
    model.cuda()
    assert parameter_ids(model) == ids
    for param in model.parameters():
        assert_remote(param)
        assert isinstance(param, nn.Parameter) and param.requires_grad and param.is_leaf
    assert model.hidden.weight.note == "set by the program"
    model.to("cuda:0")
    model.to(torch.float64)
    model.half()
    assert parameter_ids(model) == ids
    assert all(param.dtype == torch.float16 for param in model.parameters())
    model.float().cpu()
    assert parameter_ids(model) == ids
    for param in model.parameters():
        assert type(param) is nn.Parameter and param.device.type == "cpu"
    assert model.hidden.weight.note == "set by the program"
    local = tied_model()
    for (name, moved), (_, original) in zip(model.named_parameters(), local.named_parameters()):
        torch.testing.assert_close(moved, original.half().float(), msg=name)


def test_a_remote_parameter_prints_as_a_cuda_parameter(remote):
    local = nn.Linear(3, 2)
    model = copy.deepcopy(local).cuda()
    expected = repr(local.weight).replace("requires_grad=True", "device='cuda:0', requires_grad=True")
    assert expected.startswith("Parameter containing:\ntensor([[")
    assert repr(model.weight) == expected
    assert str(model.weight) == expected


def test_buffers_are_converted_as_torch_does(remote):
    # torch's _apply stores the converted buffer (self._buffers[key] = fn(buf)) on every device:
    # a move gives new buffer objects, a move to where they already are keeps them.
    model = tied_model().cuda()
    buffers = {name: id(buffer) for name, buffer in model.named_buffers()}
    assert_remote(model.norm.running_mean)
    model.to("cuda")
    assert {name: id(buffer) for name, buffer in model.named_buffers()} == buffers
    model(tokens().cuda())  # a training forward updates the running statistics the module holds
    local = tied_model()
    local(tokens())
    torch.testing.assert_close(model.norm.running_mean.cpu(), local.norm.running_mean)


def test_tied_weights_stay_tied_and_gradients_match_local(remote):
    model = tied_model().cuda()
    local = tied_model()
    assert model.head.weight is model.embed.weight
    assert len(list(model.parameters())) == len(list(local.parameters()))
    nn.functional.cross_entropy(model(tokens().cuda()), tokens().cuda()).backward()
    nn.functional.cross_entropy(local(tokens()), tokens()).backward()
    for (name, param), (_, expected) in zip(model.named_parameters(), local.named_parameters()):
        assert_remote(param.grad)
        torch.testing.assert_close(param.grad.cpu(), expected.grad, rtol=RTOL, atol=ATOL, msg=name)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, device: str, steps: int = 6) -> list[float]:
    losses = []
    for step in range(steps):
        batch = tokens(seed=step).to(device)
        loss = nn.functional.cross_entropy(model(batch), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_optimizer_built_before_the_move_trains_the_model(remote):
    # Hugging Face accelerate's order (and many scripts'): the optimizer holds the parameters
    # before the model moves; it must step the tensors the model computes with.
    model = tied_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    model.to("cuda")
    local = tied_model()
    local_optimizer = torch.optim.AdamW(local.parameters(), lr=0.05)
    losses = train(model, optimizer, "cuda")
    expected = train(local, local_optimizer, "cpu")
    assert losses[-1] < losses[0]
    assert losses == pytest.approx(expected, rel=RTOL, abs=ATOL)
    assert set(map(id, optimizer.state)) == set(parameter_ids(model))
    for (name, param), (_, reference) in zip(model.named_parameters(), local.named_parameters()):
        torch.testing.assert_close(param.detach().cpu(), reference.detach(), rtol=RTOL, atol=ATOL, msg=name)


def test_optimizer_state_follows_the_model_through_load_state_dict(remote):
    # Steps on the CPU, then the model moves; torch's way to bring the state along is
    # optimizer.load_state_dict(optimizer.state_dict()), which casts it to each parameter's device.
    model = tied_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    local = tied_model()
    local_optimizer = torch.optim.Adam(local.parameters(), lr=0.05)
    assert train(model, optimizer, "cpu", steps=2) == train(local, local_optimizer, "cpu", steps=2)
    model.cuda()
    optimizer.load_state_dict(optimizer.state_dict())
    for state in optimizer.state.values():
        assert_remote(state["exp_avg"])
    losses = train(model, optimizer, "cuda", steps=3)
    assert losses == pytest.approx(train(local, local_optimizer, "cpu", steps=3), rel=RTOL, abs=ATOL)


def test_gradients_keep_their_objects_and_move_with_the_parameter(remote):
    model = tied_model()
    nn.functional.cross_entropy(model(tokens()), tokens()).backward()
    grads = [param.grad for param in model.parameters()]
    values = [grad.clone() for grad in grads]
    model.cuda()
    for param, grad, value in zip(model.parameters(), grads, values):
        assert param.grad is grad
        assert_remote(grad)
        torch.testing.assert_close(grad.cpu(), value)
    model.cpu()
    assert [param.grad for param in model.parameters()] == grads
    assert all(grad.device.type == "cpu" for grad in grads)


def test_moves_neither_copy_tied_weights_twice_nor_leak_daemon_memory(remote):
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    model = tied_model()
    expected = sum(param.nbytes for param in model.parameters()) + sum(buffer.nbytes for buffer in model.buffers())
    model.cuda()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == baseline + expected
    model.cpu()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == baseline
    assert torch.equal(model.embed.weight, tied_model().embed.weight)


def test_to_empty_keeps_host_parameters_and_replaces_meta_ones_as_on_cuda(remote):
    model = nn.Linear(5, 3)
    ids = parameter_ids(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.to_empty(device="cuda")
    assert parameter_ids(model) == ids  # CPU -> CUDA: rebound in place
    for param in model.parameters():
        assert_remote(param)
        assert param.requires_grad
    model.reset_parameters()
    model(torch.randn(2, 5, device="cuda")).sum().backward()
    before = model.weight.detach().cpu()
    optimizer.step()
    assert not torch.equal(model.weight.detach().cpu(), before)
    # meta -> CUDA is not a compatible move for torch: new Parameters, as on CUDA.
    with torch.device("meta"):
        lazy = nn.Linear(5, 3)
    meta_ids = parameter_ids(lazy)
    lazy.to_empty(device="cuda")
    assert all(new != old for new, old in zip(parameter_ids(lazy), meta_ids))
    for param in lazy.parameters():
        assert_remote(param)
        assert isinstance(param, nn.Parameter) and param.requires_grad


def test_load_state_dict_assign_takes_the_remote_tensors(remote):
    torch.manual_seed(0)
    source = nn.Linear(4, 3).cuda()
    state = source.state_dict()
    with torch.device("meta"):
        model = nn.Linear(4, 3)
    model.load_state_dict(state, assign=True)
    for name, param in model.named_parameters():
        assert_remote(param)
        assert isinstance(param, nn.Parameter) and param.requires_grad
        torch.testing.assert_close(param.detach().cpu(), state[name].cpu())
    with torch.no_grad():
        state["bias"].add_(1.0)  # as on CUDA, the Parameter shares the state dict tensor's memory
    torch.testing.assert_close(model.bias.detach().cpu(), source.bias.detach().cpu())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.to("cuda")
    before = model.bias.detach().cpu()
    model(torch.randn(2, 4, device="cuda")).sum().backward()  # d(sum)/d(bias) = 2 per element
    optimizer.step()
    torch.testing.assert_close(model.bias.detach().cpu(), before - 0.2)


@pytest.mark.parametrize(("overwrite", "swap", "kept"), [
    (False, False, True),   # torch's default: .data = rebinds the same objects
    (True, False, False),   # overwrite_module_params_on_conversion: new objects, as on CUDA
    (False, True, True),    # swap_module_params_on_conversion: torch's swap_tensors keeps them
])
def test_future_settings_give_what_they_give_on_cuda(remote, overwrite, swap, kept):
    saved = (torch.__future__.get_overwrite_module_params_on_conversion(),
             torch.__future__.get_swap_module_params_on_conversion())
    torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
    torch.__future__.set_swap_module_params_on_conversion(swap)
    try:
        model = tied_model()
        ids = parameter_ids(model)
        model.cuda()
        assert (parameter_ids(model) == ids) is kept
        for param in model.parameters():
            assert_remote(param)
            assert isinstance(param, nn.Parameter)
        model.cpu()
        assert (parameter_ids(model) == ids) is kept
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(saved[0])
        torch.__future__.set_swap_module_params_on_conversion(saved[1])


def test_a_graph_or_view_recorded_before_the_move_does_not_stop_it(remote):
    # ref = model(x) on the CPU, then model.cuda(): autograd's graph (and a view) still hold the
    # old tensor. CUDA rebinds anyway; so does libremote, silently.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    x = torch.randn(2, 3, 6, 6)
    reference = model(x)
    row = model[2].weight[0]
    ids = parameter_ids(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.cuda()
    assert not [w for w in caught if "libremote" in str(w.message)]
    assert parameter_ids(model) == ids
    assert torch.equal(row, model[2].weight[0].detach().cpu())
    out = model(x.cuda())
    torch.testing.assert_close(out.detach().cpu(), reference.detach(), rtol=RTOL, atol=ATOL)
    out.sum().backward()
    optimizer.step()
    assert not torch.equal(model[2].weight[0].detach().cpu(), row)
    with pytest.raises(RuntimeError, match="before its parameters moved"):
        reference.sum().backward()  # the old graph's gradients have no parameter to go to


def test_a_parameter_that_cannot_be_kept_is_replaced_with_a_warning_at_the_program_line(remote):
    # A weak reference to the parameter (torch's caches keyed by weak reference expect its
    # contents to stay): the move still happens, as a new Parameter, and the program is told where.
    model = nn.Linear(3, 2)
    watcher = weakref.ref(model.weight)  # noqa: F841  (held on purpose)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.cuda()
    assert_remote(model.weight)
    messages = [w for w in caught if "new Parameter object" in str(w.message)]
    assert len(messages) == 1
    assert messages[0].filename == __file__
    assert copy.deepcopy(model).weight.shape == (2, 3)
