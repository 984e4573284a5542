"""Autograd training through libremote, compared with the same code run on the local CPU.

Each test builds its model on the CPU from the same seed, copies it to ``cuda`` (the daemon's
device) and trains it there, then does the same purely locally; the losses of every step, the
gradients and the final parameters must agree within float tolerance.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import pytest
import torch
from torch import nn

from libremote.client.tensor import RemoteTensor

RTOL = 1e-4
ATOL = 1e-5


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def build(factory: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return factory()


def assert_remote(tensor: torch.Tensor) -> None:
    assert isinstance(tensor, RemoteTensor), type(tensor)
    assert tensor.is_cuda
    assert tensor.device == torch.device("cuda", 0)


def assert_params_close(remote_model: nn.Module, local_model: nn.Module, rtol: float = RTOL, atol: float = ATOL) -> None:
    remote_params = dict(remote_model.named_parameters())
    local_params = dict(local_model.named_parameters())
    assert remote_params.keys() == local_params.keys()
    for name, local in local_params.items():
        remote = remote_params[name]
        assert_remote(remote)
        assert isinstance(remote, nn.Parameter), name
        torch.testing.assert_close(remote.detach().cpu(), local.detach(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def assert_grads_close(remote_model: nn.Module, local_model: nn.Module, rtol: float = RTOL, atol: float = ATOL) -> None:
    local_params = dict(local_model.named_parameters())
    for name, remote in remote_model.named_parameters():
        local = local_params[name]
        if local.grad is None:
            assert remote.grad is None, name
            continue
        assert remote.grad is not None, name
        assert_remote(remote.grad)
        torch.testing.assert_close(remote.grad.cpu(), local.grad, rtol=rtol, atol=atol, msg=lambda m: f"grad of {name}: {m}")


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: str,
    clip: float | None = None,
) -> list[float]:
    losses = []
    model.train()
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        optimizer.zero_grad()
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        losses.append(loss.item())
    return losses


def compare_training(
    factory: Callable[[], nn.Module],
    make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    rtol: float = RTOL,
    atol: float = ATOL,
    clip: float | None = None,
) -> tuple[nn.Module, nn.Module]:
    local_model = build(factory)
    remote_model = build(factory).cuda()
    for parameter in remote_model.parameters():
        assert_remote(parameter)
    local_losses = train(local_model, make_optimizer(local_model.parameters()), batches, loss_fn, "cpu", clip)
    remote_losses = train(remote_model, make_optimizer(remote_model.parameters()), batches, loss_fn, "cuda", clip)
    assert len(remote_losses) == len(local_losses)
    for step, (got, expected) in enumerate(zip(remote_losses, local_losses)):
        assert got == pytest.approx(expected, rel=rtol, abs=atol), f"step {step}: {remote_losses} vs {local_losses}"
    assert_params_close(remote_model, local_model, rtol, atol)
    return remote_model, local_model


def classification_batches(steps: int, batch: int, input_shape: tuple[int, ...], classes: int,
                           seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, *input_shape, generator=generator), torch.randint(0, classes, (batch,), generator=generator))
        for _ in range(steps)
    ]


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 5))


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


class LSTMRegressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size=6, hidden_size=16, num_layers=2, batch_first=True)
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output, (h, c) = self.lstm(x)
        return self.head(output[:, -1, :]).squeeze(-1)


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 50)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)))


def token_batches(steps: int, batch: int = 4, length: int = 10, vocab: int = 50, seed: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        tokens = torch.randint(0, vocab, (batch, length), generator=generator)
        out.append((tokens, torch.roll(tokens, -1, dims=1)))
    return out


def sequence_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


# ------------------------------------------------------------------------------------------------
# Whole training runs
# ------------------------------------------------------------------------------------------------
def test_mlp_sgd_momentum(remote):
    batches = classification_batches(8, 16, (20,), 5)
    compare_training(mlp, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), batches, nn.functional.cross_entropy)


def test_mlp_sgd_momentum_nesterov_weight_decay(remote):
    batches = classification_batches(6, 16, (20,), 5)
    compare_training(
        mlp,
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
        batches,
        nn.functional.cross_entropy,
    )


def test_mlp_adam(remote):
    batches = classification_batches(8, 16, (20,), 5)
    compare_training(mlp, lambda p: torch.optim.Adam(p, lr=1e-2), batches, nn.functional.cross_entropy)


@pytest.mark.parametrize("implementation", ["foreach", "fused"])
def test_mlp_adam_foreach_and_fused(remote, implementation):
    # On a real GPU torch picks the foreach implementation by default; programs also ask for it
    # (or for fused=True) explicitly. Both run multi-tensor ops (_foreach_*, _fused_adam_).
    batches = classification_batches(6, 16, (20,), 5)
    compare_training(
        mlp, lambda p: torch.optim.Adam(p, lr=1e-2, **{implementation: True}), batches, nn.functional.cross_entropy
    )


def test_mlp_sgd_foreach(remote):
    batches = classification_batches(6, 16, (20,), 5)
    compare_training(
        mlp, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, foreach=True), batches, nn.functional.cross_entropy
    )


def test_cnn_batchnorm_sgd(remote):
    batches = classification_batches(6, 8, (3, 16, 16), 10)
    remote_model, local_model = compare_training(
        SmallCNN, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), batches, nn.functional.cross_entropy
    )
    # BatchNorm running statistics (buffers) are updated on the daemon too.
    local_buffers = dict(local_model.named_buffers())
    for name, buffer in remote_model.named_buffers():
        assert_remote(buffer)
        torch.testing.assert_close(buffer.cpu(), local_buffers[name], rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


def test_lstm_two_layers_adam(remote):
    generator = torch.Generator().manual_seed(2)
    batches = [(torch.randn(4, 7, 6, generator=generator), torch.randn(4, generator=generator)) for _ in range(6)]
    compare_training(LSTMRegressor, lambda p: torch.optim.Adam(p, lr=1e-2), batches, nn.functional.mse_loss)


class GRUClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(input_size=6, hidden_size=12, batch_first=True)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h = self.gru(x)
        return self.head(h[-1])


def test_gru_sgd(remote):
    generator = torch.Generator().manual_seed(8)
    batches = [(torch.randn(4, 5, 6, generator=generator), torch.randint(0, 3, (4,), generator=generator)) for _ in range(5)]
    compare_training(GRUClassifier, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), batches, nn.functional.cross_entropy)


class PackedLSTMClassifier(nn.Module):
    """Variable-length sequences the usual way: padded, packed with host lengths, unpacked."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size=5, hidden_size=8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, padded: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        packed = nn.utils.rnn.pack_padded_sequence(padded, lengths, batch_first=True, enforce_sorted=False)
        output, (h, _) = self.lstm(packed)
        unpacked, unpacked_lengths = nn.utils.rnn.pad_packed_sequence(output, batch_first=True)
        return self.head(h[-1]) + unpacked.sum(1)[:, :3] / unpacked_lengths.to(padded.device).unsqueeze(1), unpacked_lengths


def test_packed_sequences_train_as_on_cuda(remote):
    # CUDA keeps a PackedSequence's batch_sizes and pad_packed_sequence's lengths on the host
    # (torch refuses a PackedSequence otherwise): they come back as host tensors here too.
    generator = torch.Generator().manual_seed(5)
    batches = []
    for _ in range(4):
        lengths = torch.randint(1, 7, (4,), generator=generator)
        padded = torch.randn(4, 6, 5, generator=generator) * (torch.arange(6) < lengths[:, None])[..., None]
        batches.append((padded, lengths, torch.randint(0, 3, (4,), generator=generator)))
    local_model, remote_model = build(PackedLSTMClassifier), build(PackedLSTMClassifier).cuda()
    for model, device in ((local_model, "cpu"), (remote_model, "cuda")):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        model.losses, model.input_grads = [], []
        for padded, lengths, labels in batches:
            padded = padded.detach().to(device).requires_grad_()
            optimizer.zero_grad()
            logits, unpacked_lengths = model(padded, lengths)
            assert unpacked_lengths.device.type == "cpu"
            assert torch.equal(unpacked_lengths, lengths)
            loss = nn.functional.cross_entropy(logits, labels.to(device))
            loss.backward()
            optimizer.step()
            model.losses.append(loss.item())
            model.input_grads.append(padded.grad.cpu())
    assert remote_model.losses == pytest.approx(local_model.losses, rel=RTOL, abs=ATOL)
    for got, expected in zip(remote_model.input_grads, local_model.input_grads):
        torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    assert_params_close(remote_model, local_model)
    packed = nn.utils.rnn.pack_sequence([torch.ones(3, 2), torch.ones(1, 2)]).to("cuda")
    assert packed.data.is_cuda and packed.batch_sizes.device.type == "cpu"
    assert packed.batch_sizes.tolist() == [2, 1, 1]


@pytest.mark.parametrize("mode, weighted, include_last_offset", [
    ("sum", False, False), ("mean", False, False), ("max", False, False),
    ("sum", True, False), ("mean", False, True), ("max", False, True),
])
def test_embedding_bag_trains_like_local_torch(remote, mode, weighted, include_last_offset):
    """nn.EmbeddingBag with offsets (an empty bag among them) and per_sample_weights that are
    trained too: the daemon runs embedding bag's backward kernels
    (their bookkeeping checked per call, server/op_rules.py) and every step matches local torch."""
    generator = torch.Generator().manual_seed(11)
    local = build(lambda: nn.EmbeddingBag(20, 5, mode=mode, include_last_offset=include_last_offset))
    remote_bag = copy.deepcopy(local).to("cuda")
    local_weights = torch.rand(9, generator=generator, requires_grad=True)
    remote_weights = local_weights.detach().to("cuda").requires_grad_()
    runs = [(local, local_weights, "cpu"), (remote_bag, remote_weights, "cuda")]
    optimizers = [torch.optim.SGD([*model.parameters(), weights], lr=0.5) for model, weights, _ in runs]
    offsets = torch.tensor([0, 3, 3, 7] + ([9] if include_last_offset else []))  # bag 1 is empty
    for _step in range(3):
        indices = torch.randint(0, 20, (9,), generator=generator)
        target = torch.randn(4, 5, generator=generator)
        for (model, weights, device), optimizer in zip(runs, optimizers):
            optimizer.zero_grad()
            output = model(indices.to(device), offsets.to(device), per_sample_weights=weights if weighted else None)
            loss = ((output - target.to(device)) ** 2).sum()
            loss.backward()
            optimizer.step()
        assert_grads_close(remote_bag, local, rtol=1e-6, atol=1e-6)
        assert_params_close(remote_bag, local, rtol=1e-6, atol=1e-6)
        if weighted:
            torch.testing.assert_close(remote_weights.grad.cpu(), local_weights.grad, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(remote_weights.detach().cpu(), local_weights.detach(), rtol=1e-6, atol=1e-6)


def test_data_parallel_on_one_device_trains_like_the_module(remote):
    # Old scripts wrap their model in nn.DataParallel whenever CUDA is there; its scatter and
    # gather are torch.nn.parallel.comm functions (C++ CUDA code in torch; remote ops here).
    batches = classification_batches(4, 8, (20,), 5)
    local_model = build(mlp)
    remote_model = build(mlp).cuda()
    wrapped = nn.DataParallel(remote_model)
    local_losses = train(local_model, torch.optim.SGD(local_model.parameters(), lr=0.1), batches,
                         nn.functional.cross_entropy, "cpu")
    remote_losses = train(wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.1), batches,
                          nn.functional.cross_entropy, "cuda")
    assert remote_losses == pytest.approx(local_losses, rel=RTOL, abs=ATOL)
    assert_params_close(remote_model, local_model)
    scattered = torch.nn.parallel.comm.scatter(torch.arange(6.0).cuda(), devices=[0], dim=0)
    assert len(scattered) == 1 and torch.equal(scattered[0].cpu(), torch.arange(6.0))
    gathered = torch.nn.parallel.comm.gather([torch.ones(2).cuda(), torch.zeros(1).cuda()], destination=-1)
    assert gathered.device.type == "cpu" and gathered.tolist() == [1.0, 1.0, 0.0]


def test_record_stream_and_pinned_factories_are_accepted(remote):
    x = torch.ones(4, device="cuda")
    x.record_stream(torch.cuda.current_stream())  # torch's parser refused libremote's stream
    assert x.sum().item() == 4.0
    staging = torch.empty(4, pin_memory=True)  # host memory: no pinning needed (nor possible)
    assert staging.device.type == "cpu"
    staging.fill_(2.0)
    assert staging.to("cuda", non_blocking=True).sum().item() == 8.0


def test_transformer_encoder_adamw(remote):
    compare_training(
        TinyTransformer,
        # eps=1e-6: the key projection's bias has a mathematically zero gradient (softmax ignores a
        # per-query constant), so its float noise (~1e-9) would be blown up to full lr-sized Adam
        # steps with the default eps=1e-8 and differ between any two kernels, local or remote.
        lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01, eps=1e-6),
        token_batches(5),
        sequence_loss,
        rtol=1e-4,
        atol=1e-4,
    )


def test_training_with_gradient_clipping(remote):
    batches = classification_batches(6, 16, (20,), 5)
    compare_training(mlp, lambda p: torch.optim.SGD(p, lr=0.5), batches, nn.functional.cross_entropy, clip=0.1)


# ------------------------------------------------------------------------------------------------
# Gradients
# ------------------------------------------------------------------------------------------------
def _one_backward(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, device: str) -> torch.Tensor:
    loss = nn.functional.cross_entropy(model(inputs.to(device)), targets.to(device))
    loss.backward()
    return loss


def test_backward_grads_match_local(remote):
    (inputs, targets), = classification_batches(1, 16, (20,), 5)
    local_model, remote_model = build(mlp), build(mlp).cuda()
    local_loss = _one_backward(local_model, inputs, targets, "cpu")
    remote_loss = _one_backward(remote_model, inputs, targets, "cuda")
    assert_remote(remote_loss)
    assert remote_loss.item() == pytest.approx(local_loss.item(), rel=RTOL)
    assert_grads_close(remote_model, local_model)
    # A second backward accumulates into .grad, like on any device.
    _one_backward(local_model, inputs, targets, "cpu")
    _one_backward(remote_model, inputs, targets, "cuda")
    assert_grads_close(remote_model, local_model)


def test_cnn_grads_match_local(remote):
    (inputs, targets), = classification_batches(1, 4, (3, 16, 16), 10)
    local_model, remote_model = build(SmallCNN), build(SmallCNN).cuda()
    _one_backward(local_model, inputs, targets, "cpu")
    _one_backward(remote_model, inputs, targets, "cuda")
    assert_grads_close(remote_model, local_model)


def test_autograd_grad(remote):
    torch.manual_seed(5)
    x_host, w_host = torch.randn(6, 4), torch.randn(4, 3)

    def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (torch.sigmoid(x @ w) ** 2).sum()

    x_local, w_local = x_host.clone().requires_grad_(), w_host.clone().requires_grad_()
    expected = torch.autograd.grad(f(x_local, w_local), [x_local, w_local])
    x_remote, w_remote = x_host.cuda().requires_grad_(), w_host.cuda().requires_grad_()
    got = torch.autograd.grad(f(x_remote, w_remote), [x_remote, w_remote])
    assert len(got) == 2
    for g, e in zip(got, expected):
        assert_remote(g)
        torch.testing.assert_close(g.cpu(), e, rtol=RTOL, atol=ATOL)
    # autograd.grad does not populate .grad
    assert x_remote.grad is None and w_remote.grad is None


def test_retain_graph_backward_twice(remote):
    torch.manual_seed(6)
    host = torch.randn(5, 5)

    def run(device: str) -> torch.Tensor:
        x = host.to(device).requires_grad_()
        y = (x.exp() * x.sin()).sum()
        y.backward(retain_graph=True)
        first = x.grad.clone()
        y.backward()  # the graph was kept: a second pass works and accumulates
        torch.testing.assert_close(x.grad.cpu(), (2 * first).cpu())
        return x.grad

    remote_grad = run("cuda")
    assert_remote(remote_grad)
    torch.testing.assert_close(remote_grad.cpu(), run("cpu"), rtol=RTOL, atol=ATOL)


def test_backward_twice_without_retain_graph_raises(remote):
    x = torch.randn(4).cuda().requires_grad_()
    y = (x.exp() * x).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="second time|retain_graph"):
        y.backward()


def test_double_backward_create_graph(remote):
    torch.manual_seed(7)
    host = torch.randn(6)

    def run(device: str) -> tuple[torch.Tensor, torch.Tensor]:
        x = host.to(device).requires_grad_()
        y = (x ** 3 + torch.tanh(x)).sum()
        (g,) = torch.autograd.grad(y, x, create_graph=True)
        (gg,) = torch.autograd.grad(g.sum(), x)
        return g.detach(), gg

    remote_g, remote_gg = run("cuda")
    local_g, local_gg = run("cpu")
    assert_remote(remote_gg)
    torch.testing.assert_close(remote_g.cpu(), local_g, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(remote_gg.cpu(), local_gg, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("foreach", [None, True])
def test_clip_grad_norm(remote, foreach):
    (inputs, targets), = classification_batches(1, 16, (20,), 5)
    local_model, remote_model = build(mlp), build(mlp).cuda()
    _one_backward(local_model, inputs, targets, "cpu")
    _one_backward(remote_model, inputs, targets, "cuda")
    local_norm = nn.utils.clip_grad_norm_(local_model.parameters(), max_norm=0.05)
    remote_norm = nn.utils.clip_grad_norm_(remote_model.parameters(), max_norm=0.05, foreach=foreach)
    assert_remote(remote_norm)
    assert remote_norm.item() == pytest.approx(local_norm.item(), rel=RTOL)
    assert local_norm.item() > 0.05  # clipping actually happened
    assert_grads_close(remote_model, local_model)
    total = torch.sqrt(sum((p.grad.cpu() ** 2).sum() for p in remote_model.parameters()))
    assert total.item() == pytest.approx(0.05, rel=1e-3)


def test_clip_grad_value_and_inf_norm(remote):
    (inputs, targets), = classification_batches(1, 16, (20,), 5)
    local_model, remote_model = build(mlp), build(mlp).cuda()
    _one_backward(local_model, inputs, targets, "cpu")
    _one_backward(remote_model, inputs, targets, "cuda")
    local_norm = nn.utils.clip_grad_norm_(local_model.parameters(), max_norm=0.01, norm_type=float("inf"))
    remote_norm = nn.utils.clip_grad_norm_(remote_model.parameters(), max_norm=0.01, norm_type=float("inf"))
    assert remote_norm.item() == pytest.approx(local_norm.item(), rel=RTOL)
    nn.utils.clip_grad_value_(local_model.parameters(), 0.001)
    nn.utils.clip_grad_value_(remote_model.parameters(), 0.001)
    assert_grads_close(remote_model, local_model)


def test_requires_grad_on_cuda_leaf(remote):
    host = torch.randn(3, 4)
    x = host.cuda()
    assert not x.requires_grad
    assert x.is_leaf
    returned = x.requires_grad_()
    assert returned is x
    assert x.requires_grad and x.is_leaf and x.grad_fn is None
    y = (x * x).sum()
    assert y.requires_grad and y.grad_fn is not None
    y.backward()
    assert x.grad is not None
    assert_remote(x.grad)
    assert x.grad.shape == x.shape
    torch.testing.assert_close(x.grad.cpu(), 2 * host)
    # Turning it off again
    x.requires_grad_(False)
    assert not (x * 2).requires_grad


def test_factory_with_requires_grad_on_cuda(remote):
    x = torch.ones(3, device="cuda", requires_grad=True)
    assert x.is_leaf and x.requires_grad
    (x * torch.arange(3.0, device="cuda")).sum().backward()
    torch.testing.assert_close(x.grad.cpu(), torch.arange(3.0))


def test_detach_and_no_grad_stop_gradients(remote):
    x = torch.randn(4).cuda().requires_grad_()
    with torch.no_grad():
        y = x * 2
    assert not y.requires_grad
    z = x.detach() * 2
    assert not z.requires_grad
    w = (x * 2).sum() + z.sum()
    w.backward()
    torch.testing.assert_close(x.grad.cpu(), torch.full((4,), 2.0))


# ------------------------------------------------------------------------------------------------
# zero_grad, optimizer state
# ------------------------------------------------------------------------------------------------
def test_zero_grad_set_to_none(remote):
    (inputs, targets), = classification_batches(1, 8, (20,), 5)
    model = build(mlp).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _one_backward(model, inputs, targets, "cuda")
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())
    _one_backward(model, inputs, targets, "cuda")
    optimizer.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())
    # set_to_none=False zeroes the existing grads in place
    _one_backward(model, inputs, targets, "cuda")
    grads = [p.grad for p in model.parameters()]
    model.zero_grad(set_to_none=False)
    for p, g in zip(model.parameters(), grads):
        assert p.grad is g
        assert_remote(p.grad)
        assert torch.count_nonzero(p.grad).item() == 0
    # Training after zero_grad(set_to_none=True) matches a fresh local run.
    local_model = build(mlp)
    remote_model = build(mlp).cuda()
    batches = classification_batches(4, 8, (20,), 5)

    def loop(m: nn.Module, device: str) -> list[float]:
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.5)
        losses = []
        for x, y in batches:
            m.zero_grad(set_to_none=True)
            losses.append(_one_backward(m, x, y, device).item())
            opt.step()
        return losses

    assert loop(remote_model, "cuda") == pytest.approx(loop(local_model, "cpu"), rel=RTOL, abs=ATOL)
    assert_params_close(remote_model, local_model)


def test_optimizer_state_dict_round_trip(remote):
    batches = classification_batches(8, 16, (20,), 5)
    first, second = batches[:4], batches[4:]

    def run(device: str) -> tuple[list[float], nn.Module, dict]:
        model = build(mlp).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        losses = train(model, optimizer, first, nn.functional.cross_entropy, device)
        state = copy.deepcopy(optimizer.state_dict())
        # A new optimizer restored from the state dict carries on exactly where the first one was.
        restored = torch.optim.Adam(model.parameters(), lr=1e-2)
        restored.load_state_dict(state)
        losses += train(model, restored, second, nn.functional.cross_entropy, device)
        return losses, model, restored.state_dict()

    remote_losses, remote_model, remote_state = run("cuda")
    local_losses, local_model, local_state = run("cpu")
    assert remote_losses == pytest.approx(local_losses, rel=RTOL, abs=ATOL)
    assert_params_close(remote_model, local_model)
    assert remote_state["param_groups"] == local_state["param_groups"]
    assert remote_state["state"].keys() == local_state["state"].keys()
    for key, local_entry in local_state["state"].items():
        remote_entry = remote_state["state"][key]
        assert remote_entry.keys() == local_entry.keys()
        for name in ("exp_avg", "exp_avg_sq"):
            assert_remote(remote_entry[name])
            torch.testing.assert_close(remote_entry[name].cpu(), local_entry[name], rtol=RTOL, atol=1e-6)
        assert float(remote_entry["step"]) == float(local_entry["step"]) == 8.0


def test_optimizer_state_dict_loaded_from_cpu_moves_to_cuda(remote):
    # A state dict produced on the CPU loads into an optimizer of a cuda model: torch moves the
    # state tensors to the parameters' device.
    batches = classification_batches(4, 16, (20,), 5)
    cpu_model = build(mlp)
    cpu_opt = torch.optim.SGD(cpu_model.parameters(), lr=0.1, momentum=0.9)
    train(cpu_model, cpu_opt, batches[:2], nn.functional.cross_entropy, "cpu")
    cuda_model = copy.deepcopy(cpu_model).cuda()
    cuda_opt = torch.optim.SGD(cuda_model.parameters(), lr=0.1, momentum=0.9)
    cuda_opt.load_state_dict(cpu_opt.state_dict())
    for state in cuda_opt.state.values():
        assert_remote(state["momentum_buffer"])
    remote_losses = train(cuda_model, cuda_opt, batches[2:], nn.functional.cross_entropy, "cuda")
    local_losses = train(cpu_model, cpu_opt, batches[2:], nn.functional.cross_entropy, "cpu")
    assert remote_losses == pytest.approx(local_losses, rel=RTOL, abs=ATOL)
    assert_params_close(cuda_model, cpu_model)


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------
def test_eval_no_grad_inference_cnn(remote):
    batches = classification_batches(4, 8, (3, 16, 16), 10)
    remote_model, local_model = compare_training(
        SmallCNN, lambda p: torch.optim.SGD(p, lr=0.05), batches[:3], nn.functional.cross_entropy
    )
    test_inputs = batches[3][0]
    remote_model.eval()
    local_model.eval()
    with torch.no_grad():
        remote_out = remote_model(test_inputs.to("cuda"))
        local_out = local_model(test_inputs)
    assert_remote(remote_out)
    assert not remote_out.requires_grad
    assert remote_out.grad_fn is None
    torch.testing.assert_close(remote_out.cpu(), local_out, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(remote_out.argmax(dim=1).cpu(), local_out.argmax(dim=1))
    # eval mode used the running stats: running stats did not move during inference.
    before = [b.cpu() for b in remote_model.buffers()]
    with torch.no_grad():
        remote_model(test_inputs.to("cuda"))
    for b0, b1 in zip(before, remote_model.buffers()):
        torch.testing.assert_close(b0, b1.cpu())


def test_eval_inference_mode_mlp(remote):
    local_model, remote_model = build(mlp), build(mlp).cuda()
    inputs = torch.randn(10, 20)
    local_model.eval()
    remote_model.eval()
    with torch.inference_mode():
        remote_out = remote_model(inputs.cuda())
        expected = local_model(inputs)
    torch.testing.assert_close(remote_out.cpu(), expected, rtol=RTOL, atol=ATOL)
    probabilities = torch.softmax(remote_out, dim=-1)
    torch.testing.assert_close(probabilities.sum(dim=-1).cpu(), torch.ones(10))


def test_eval_no_grad_transformer(remote):
    # In eval mode under no_grad, TransformerEncoder may take its fused "fast path".
    local_model, remote_model = build(TinyTransformer), build(TinyTransformer).cuda()
    (tokens, _), = token_batches(1)
    local_model.eval()
    remote_model.eval()
    with torch.no_grad():
        remote_out = remote_model(tokens.cuda())
        expected = local_model(tokens)
    assert_remote(remote_out)
    torch.testing.assert_close(remote_out.cpu(), expected, rtol=RTOL, atol=1e-4)


def test_eval_no_grad_lstm(remote):
    local_model, remote_model = build(LSTMRegressor), build(LSTMRegressor).cuda()
    inputs = torch.randn(3, 5, 6)
    local_model.eval()
    remote_model.eval()
    with torch.no_grad():
        remote_out = remote_model(inputs.cuda())
        expected = local_model(inputs)
    torch.testing.assert_close(remote_out.cpu(), expected, rtol=RTOL, atol=ATOL)
