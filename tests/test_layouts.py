"""Strides and memory-format decisions: what the client says equals the daemon's tensor and local torch.

The client never waits for an op's result: it works out each result's shape and strides locally
(meta kernels, cached per argument signature) and the daemon's kernels pick their own. Where the
two differ, views computed on the client address the wrong elements on the daemon, and
layout-checking kernels (``native_group_norm``) refuse what they get. Each check here compares
three things for every result: the remote tensor's metadata, the metadata of the daemon's real
tensor (asked with an ``OP_SYNC`` of ``aten::alias``, which keeps a tensor's layout), and the
metadata plain local CPU torch gives for the same code. A few CPU kernels lay results out
unlike CUDA's; there the program is owed CUDA's layout, which the daemon emulates on the CPU
(server/translations.py), and the tests expect it (:data:`CUDA_LAYOUTS`,
``test_batch_norm_results_as_on_cuda``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

CUDA = torch.device("cuda", 0)
FORMATS = (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def layout(tensor: torch.Tensor) -> tuple[Any, ...]:
    """Everything about a tensor's layout that code can observe, values aside."""
    formats = tuple(
        tensor.is_contiguous(memory_format=f)
        for f in FORMATS
        if f is torch.contiguous_format or tensor.dim() == (4 if f is torch.channels_last else 5)
    )
    return tensor.dtype, tuple(tensor.shape), tensor.stride(), tensor.storage_offset(), formats


def daemon_layout(tensor: torch.Tensor) -> tuple[Any, ...]:
    """The layout of the daemon's own tensor behind ``tensor`` (a round trip)."""
    from libremote.client import runtime
    from libremote_wire.messages import Cmd

    session = runtime.current()
    handle = session.new_handle()
    try:
        (_, metas), _ = session.request([Cmd.OP_SYNC, session.op_ref("aten::alias"), [tensor._ref.wire], {}, [handle]])
    finally:
        session.release(handle)
    dtype, shape, stride, offset = metas[0]
    real = torch.empty(0, dtype=dtype, device="meta").as_strided(shape, stride, offset)
    return layout(real)


def check_layout(got: Any, expected: Any, what: str) -> None:
    """``got`` (remote results) has the layouts of ``expected`` (local results), on the client
    and on the daemon."""
    if isinstance(expected, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(expected), what
        for index, (g, e) in enumerate(zip(got, expected)):
            check_layout(g, e, f"{what}[{index}]")
        return
    if not isinstance(expected, torch.Tensor):
        return
    assert got.is_cuda, f"{what}: a {got.device} result"
    assert layout(got) == layout(expected), f"{what}: client {layout(got)} != local torch {layout(expected)}"
    real = daemon_layout(got)
    assert real == layout(expected), f"{what}: daemon's tensor {real} != local torch {layout(expected)}"


def on_both(make: Callable[[], Any]) -> tuple[Any, Any]:
    """``make()``'s host tensors, and the same values on ``cuda`` (laid out the same)."""
    host = make()
    return host, _to_cuda(host)


def _to_cuda(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        # Upload the whole storage and take the same view of it: .cuda() of a view would
        # make it dense.
        base = torch.empty(0, dtype=value.dtype).set_(value.untyped_storage()).cuda()
        return base.as_strided(value.shape, value.stride(), value.storage_offset())
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cuda(item) for item in value)
    if isinstance(value, dict):
        return {key: _to_cuda(item) for key, item in value.items()}
    return value


# ----------------------------------------------------------------------------------------------
# (1) The reported case: diffusers' UNet2D attention block at batch size 1
# ----------------------------------------------------------------------------------------------
def _attention_block(x: torch.Tensor, linear: torch.nn.Module, norm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What diffusers' ``Attention`` (AttnProcessor2_0) does to a (B, C, H, W) input, then the
    next resnet's GroupNorm."""
    batch, channels, height, width = x.shape
    residual = x
    hidden = x.view(batch, channels, height * width).transpose(1, 2)
    q = linear(hidden).view(batch, -1, 1, channels).transpose(1, 2)
    k = linear(hidden).view(batch, -1, 1, channels).transpose(1, 2)
    v = linear(hidden).view(batch, -1, 1, channels).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, -1, channels)
    out = linear(out).transpose(-1, -2).reshape(batch, channels, height, width)
    steps = {"reshaped": out}
    steps["added"] = out = out + residual
    steps["rescaled"] = out = out / 1.0
    steps["group_norm"] = norm(out)
    return steps


@pytest.mark.parametrize("batch", [1, 2])
def test_attention_block_then_group_norm(remote, batch):
    torch.manual_seed(0)
    linear, norm = torch.nn.Linear(32, 32), torch.nn.GroupNorm(8, 32)
    x = torch.randn(batch, 32, 4, 4)
    with torch.no_grad():
        expected = _attention_block(x, linear, norm)
        got = _attention_block(x.cuda(), linear.cuda(), norm.cuda())
    for name in expected:
        check_layout(got[name], expected[name], name)
    torch.testing.assert_close(got["group_norm"].cpu(), expected["group_norm"], atol=1e-4, rtol=1e-4)


def test_rescaled_transposed_layout_keeps_its_strides(remote):
    """The reported layout by itself: (1, 32, 8, 8) with strides (32, 1, 256, 32), divided by a
    Python number (a wrapped number: the result keeps the size-1 dimension's stride)."""
    host, dev = on_both(lambda: torch.randn(1, 64, 32).transpose(1, 2).reshape(1, 32, 8, 8))
    assert host.stride() == dev.stride() == (32, 1, 256, 32)
    check_layout(dev / 1.0, host / 1.0, "x / 1.0")
    check_layout(F.group_norm(dev / 1.0, 8), F.group_norm(host / 1.0, 8), "group_norm(x / 1.0)")


# ----------------------------------------------------------------------------------------------
# (2) A generated family: views x elementwise / reduction / in-place / out= ops
# ----------------------------------------------------------------------------------------------
#: Inputs of shape (2, 3, 4, 4), each laid out another way.
VIEWS: dict[str, Callable[[], torch.Tensor]] = {
    "contiguous": lambda: torch.randn(2, 3, 4, 4),
    "channels_last": lambda: torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last),
    "transposed": lambda: torch.randn(2, 3, 4, 4).transpose(2, 3),
    "permuted": lambda: torch.randn(4, 4, 2, 3).permute(2, 3, 0, 1),
    "stepped": lambda: torch.randn(2, 6, 4, 8)[:, ::2, :, ::2],
    "offset": lambda: torch.randn(3, 3, 4, 4)[1:],
    "expanded": lambda: torch.randn(1, 3, 1, 4).expand(2, 3, 4, 4),
    "unsqueezed": lambda: torch.randn(2, 3, 4).unsqueeze(3).expand(2, 3, 4, 4),
}
#: Inputs with size-1 dimensions, where strides are ambiguous.
SMALL_VIEWS: dict[str, Callable[[], torch.Tensor]] = {
    "batch1_transposed": lambda: torch.randn(1, 9, 4).transpose(1, 2).reshape(1, 4, 3, 3),
    "batch1_mixed": lambda: (lambda t: t + 0 * t)(torch.randn(1, 9, 4).transpose(1, 2).reshape(1, 4, 3, 3)),
    "batch1_channels_last": lambda: torch.randn(1, 4, 3, 3).contiguous(memory_format=torch.channels_last),
    "nc11": lambda: torch.randn(2, 3, 1, 1),
    "nc11_channels_last": lambda: torch.randn(2, 3, 1, 1).contiguous(memory_format=torch.channels_last),
    "n1hw_permuted": lambda: torch.randn(2, 3, 3, 1).permute(0, 3, 1, 2),
    "size1_strided": lambda: torch.randn(4, 1, 6)[:, :, ::2].transpose(0, 2),
    "zero_dim": lambda: torch.tensor(1.5),
    "int64_transposed": lambda: torch.randint(-5, 5, (1, 9, 4)).transpose(1, 2).reshape(1, 4, 3, 3),
}
#: Second operands: broadcast against the first, of other dtypes, scalars and 0-dim tensors.
OTHERS: dict[str, Callable[[torch.Tensor], Any]] = {
    "same_layout": lambda x: x.clone(),
    "contiguous": lambda x: torch.randn(x.shape),
    "last_dim_vector": lambda x: torch.randn(x.shape[-1:]),
    "python_float": lambda x: 2.5,
    "python_int": lambda x: 3,
    "zero_dim_device": lambda x: torch.tensor(0.5),
    "zero_dim_double": lambda x: torch.tensor(0.5, dtype=torch.float64),
    "int64_same_shape": lambda x: torch.randint(1, 5, x.shape),
}
def _reversed_layout(x: torch.Tensor) -> torch.Tensor:
    """An empty tensor of ``x``'s shape, dtype and device with its dimensions' memory order
    reversed: an ``out=`` argument that already has the right shape keeps its own strides."""
    dims = list(reversed(range(x.dim())))
    return torch.empty([x.shape[d] for d in dims], dtype=x.dtype, device=x.device).permute(dims)


UNARY: dict[str, Callable[[torch.Tensor], Any]] = {
    "neg": torch.neg,
    "exp": torch.exp,
    "div_one": lambda x: x / 1.0,
    "mul_two": lambda x: x * 2,
    "relu": torch.relu,
    "to_double": lambda x: x.to(torch.float64),
    "clone": torch.clone,
    "contiguous": lambda x: x.contiguous(),
    "empty_like": lambda x: torch.empty_like(x).zero_(),
    "sum_keepdim": lambda x: x.sum(-1, keepdim=True),
    "mean_keepdim": lambda x: x.mean(1, keepdim=True),
    "amax_keepdim": lambda x: x.amax(0, keepdim=True),
    "sum_dims": lambda x: x.sum((0, -1)),
    "softmax": lambda x: x.softmax(-1),
    "cumsum": lambda x: x.cumsum(0),
    "where": lambda x: torch.where(x > 0, x, 0.0),
    "clone_neg_inplace": lambda x: x.clone().neg_(),
    "abs_out": lambda x: torch.abs(x, out=torch.empty(0, dtype=x.dtype, device=x.device)),
    "abs_out_presized": lambda x: torch.abs(x, out=_reversed_layout(x)),
    "inplace_on_view": lambda x: x.clone()[..., ::2].mul_(2) if x.dim() else x.clone().mul_(2),
}
BINARY: dict[str, Callable[[Any, Any], Any]] = {
    "add": torch.add,
    "mul": torch.mul,
    "true_div": torch.true_divide,
    "maximum": lambda a, b: torch.maximum(a, b if isinstance(b, torch.Tensor) else torch.tensor(b)),
    "lt": torch.lt,
    "reverse_sub": lambda a, b: b - a,
    "inplace_add": lambda a, b: a.clone().add_(b) if torch.result_type(a, b) == a.dtype else a + b,
    "add_out": lambda a, b: torch.add(a, b, out=torch.empty(0, dtype=torch.result_type(a, b), device=a.device)),
}


def _run_family(view_name: str, make: Callable[[], torch.Tensor]) -> None:
    """Every unary op on the view, and every binary op on it and each kind of second operand."""
    torch.manual_seed(0)
    host, dev = on_both(make)
    for name, op in UNARY.items():
        if host.dim() == 0 and name in ("amax_keepdim", "sum_dims", "mean_keepdim", "cumsum"):
            continue
        if host.dtype == torch.int64 and name in ("exp", "softmax", "mean_keepdim"):
            continue
        check_layout(op(dev), op(host), f"{name}({view_name})")
    for other_name, make_other in OTHERS.items():
        torch.manual_seed(1)
        other_host = make_other(host)
        other_dev = _to_cuda(other_host)
        if isinstance(other_host, torch.Tensor) and other_host.dim() == 0 and other_name == "zero_dim_device":
            other_dev = other_host.cuda()  # a 0-dim cuda tensor
        elif isinstance(other_host, torch.Tensor) and other_host.dim() == 0:
            other_dev = other_host  # a 0-dim host tensor next to a device one, as CUDA allows
        for name, op in BINARY.items():
            check_layout(op(dev, other_dev), op(host, other_host), f"{name}({view_name}, {other_name})")


@pytest.mark.parametrize("view", VIEWS)
def test_layout_family(remote, view):
    _run_family(view, VIEWS[view])


@pytest.mark.parametrize("view", SMALL_VIEWS)
def test_layout_family_size_one_dims(remote, view):
    _run_family(view, SMALL_VIEWS[view])


def test_views_of_views_keep_layout(remote):
    """View chains computed on the client address the same elements on the daemon."""
    host, dev = on_both(lambda: torch.randn(1, 8, 3, 4).contiguous(memory_format=torch.channels_last))
    chains: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "transpose_reshape": lambda x: x.transpose(1, 3).reshape(1, 4, 24),
        "permute_flatten": lambda x: x.permute(0, 2, 3, 1).flatten(1),
        "slice_unsqueeze": lambda x: x[:, 1::3].unsqueeze(2),
        "select_t": lambda x: x[0, :, 1].t(),
        "squeeze_expand": lambda x: x.squeeze(0)[:, :1].expand(8, 5, 4),
        "diagonal": lambda x: x[0, :3, :3, :3].diagonal(0, 0, 1),
        "unfold": lambda x: x.reshape(-1)[5:].unfold(0, 4, 3),
        "added_then_viewed": lambda x: (x * 1.0).view(1, 8, 12),
    }
    for name, chain in chains.items():
        got, expected = chain(dev), chain(host)
        check_layout(got, expected, name)
        torch.testing.assert_close(got.cpu(), expected)


# ----------------------------------------------------------------------------------------------
# (3) torch's own OpInfo samples
# ----------------------------------------------------------------------------------------------
#: Ops whose sample inputs exercise layouts broadly, chosen to keep the run short.
OPINFO_OPS = (
    "add", "sub", "mul", "div.no_rounding_mode", "div.floor_rounding", "true_divide", "pow", "maximum",
    "minimum", "where", "lerp", "addcmul",
    "clamp", "abs", "neg", "exp", "sigmoid", "tanh", "sqrt", "rsqrt", "sin", "erf", "nn.functional.gelu",
    "nn.functional.silu", "nn.functional.relu", "nn.functional.leaky_relu", "nn.functional.softplus",
    "sum", "mean", "amax", "amin", "prod", "argmax", "std", "var", "norm", "logsumexp", "cumsum",
    "softmax", "log_softmax", "nn.functional.layer_norm", "nn.functional.group_norm",
    "nn.functional.batch_norm", "nn.functional.conv2d", "nn.functional.avg_pool2d",
    "nn.functional.max_pool2d", "nn.functional.interpolate.nearest", "nn.functional.interpolate.bilinear",
    "nn.functional.pad.constant", "nn.functional.pad.reflect",
    "cat", "stack", "index_select", "gather", "scatter", "masked_fill", "tril", "triu", "flip", "roll",
    "transpose", "permute", "expand", "narrow", "select", "unsqueeze", "squeeze", "reshape", "view",
    "flatten", "unfold", "clone", "contiguous", "mm", "bmm", "matmul", "addmm", "linalg.vector_norm",
    "eq", "lt", "logical_and", "bitwise_and", "topk", "sort", "cross", "outer", "repeat", "tile",
    "complex", "polar", "mvlgamma.mvlgamma_p_1", "isnan", "nan_to_num", "logit", "hardtanh",
    "nn.functional.pad.replicate_negative", "nn.functional.max_unpool2d", "nn.functional.pixel_shuffle",
    "nn.functional.pixel_unshuffle", "nn.functional.channel_shuffle",
)
MAX_SAMPLES = 12
#: Ops whose CPU kernel lays results out unlike CUDA's: the daemon (and so the client) follows
#: CUDA's layout there (server/translations.py). From the local result and the arguments, a
#: tensor laid out as CUDA's result is.
_FRESH_CONTIGUOUS = lambda expected, args: expected.clone(memory_format=torch.contiguous_format)  # noqa: E731
CUDA_LAYOUTS: dict[str, Callable[[torch.Tensor, tuple[Any, ...]], torch.Tensor]] = {
    **dict.fromkeys(("nn.functional.pad.reflect", "nn.functional.pad.replicate_negative",
                     "nn.functional.max_unpool2d", "nn.functional.pixel_shuffle",
                     "nn.functional.pixel_unshuffle", "nn.functional.channel_shuffle"), _FRESH_CONTIGUOUS),
    # batch_norm_cuda: output = at::empty_like(input); the CPU uses input.suggest_memory_format().
    "nn.functional.batch_norm": lambda expected, args: torch.empty_like(args[0]),
}


def _opinfo_cases() -> list[tuple[str, Any]]:
    """(name, OpInfo) of the :data:`OPINFO_OPS` torch has, a variant named ``name.variant``."""
    from torch.testing._internal.common_methods_invocations import op_db

    found = {}
    for info in op_db:
        name = f"{info.name}.{info.variant_test_name}" if info.variant_test_name else info.name
        found.setdefault(name, info)
    return [(name, found[name]) for name in OPINFO_OPS if name in found]


def _opinfo_samples(info: Any) -> list[Any]:
    dtype = torch.float32 if torch.float32 in info.supported_dtypes("cpu") else torch.int64
    torch.manual_seed(0)
    samples = []
    for sample in info.sample_inputs("cpu", dtype, requires_grad=False):
        samples.append(sample)
        if len(samples) == MAX_SAMPLES:
            break
    return samples


def _relaid(sample_input: Any) -> dict[str, Any]:
    """The sample's first input as it comes, and the same values laid out other ways: with its
    last two dimensions' order swapped in memory, and channels-last (4-D)."""
    variants = {"": sample_input}
    if isinstance(sample_input, torch.Tensor) and sample_input.dim() >= 2:
        variants[" (transposed memory)"] = sample_input.transpose(-1, -2).contiguous().transpose(-1, -2)
    if isinstance(sample_input, torch.Tensor) and sample_input.dim() == 4:
        variants[" (channels_last)"] = sample_input.contiguous(memory_format=torch.channels_last)
    return variants


def _opinfo_runs() -> list[tuple[str, Any, tuple[Any, ...], dict[str, Any]]]:
    """(description, op, args, kwargs) for every sample and layout variant, in a fixed order."""
    runs = []
    for name, info in _opinfo_cases():
        for index, sample in enumerate(_opinfo_samples(info)):
            for variant, first in _relaid(sample.input).items():
                runs.append((f"{name} sample {index}{variant}", info.op, (first, *sample.args), sample.kwargs))
    return runs


def test_opinfo_samples_match_local_strides(remote):
    """torch's OpInfo sample inputs (a broad subset of ops, at most 12 samples each, the first
    input also laid out other ways), run on ``cuda`` and compared with local CPU torch: same
    output layouts, on the client and on the daemon. Samples local torch refuses are skipped
    (the error paths are tested elsewhere)."""
    checked = 0
    mismatches = []
    for what, op, args, kwargs in _opinfo_runs():
        try:
            expected = op(*args, **kwargs)
        except Exception:
            continue
        as_on_cuda = CUDA_LAYOUTS.get(what.split(" sample")[0])
        if as_on_cuda is not None:
            expected = as_on_cuda(expected, args)
        try:
            check_layout(op(*_to_cuda(args), **_to_cuda(kwargs)), expected, what)
        except AssertionError as exc:
            mismatches.append(str(exc).splitlines()[0])
        except Exception as exc:
            mismatches.append(f"{what}: raised {type(exc).__name__}: {str(exc)[:200]}")
        checked += 1
    assert checked > 300, f"only {checked} samples ran"
    assert not mismatches, "\n".join(mismatches)


CONVOLUTIONS = {
    "conv1d": (lambda x, w, b: F.conv1d(x, w, b, padding=1), (2, 3, 9), (4, 3, 3)),
    "conv2d": (lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1), (2, 3, 8, 8), (4, 3, 3, 3)),
    "conv2d_dilated_grouped": (lambda x, w, b: F.conv2d(x, w, b, dilation=2, groups=2), (2, 4, 9, 9), (6, 2, 3, 3)),
    "conv2d_depthwise": (lambda x, w, b: F.conv2d(x, w, b, padding=1, groups=4), (2, 4, 6, 6), (4, 1, 3, 3)),
    "conv2d_one_channel": (lambda x, w, b: F.conv2d(x, w, b), (2, 1, 6, 6), (3, 1, 3, 3)),  # (ambiguous layouts:
    "conv2d_1x1_spatial": (lambda x, w, b: F.conv2d(x, w, b), (2, 3, 1, 1), (4, 3, 1, 1)),  # contiguous and channels-last)
    "conv3d": (lambda x, w, b: F.conv3d(x, w, b, padding=1), (1, 2, 4, 5, 5), (3, 2, 3, 3, 3)),
    "conv_transpose2d": (lambda x, w, b: F.conv_transpose2d(x, w, b, stride=2), (2, 3, 4, 4), (3, 5, 3, 3)),
}


@pytest.mark.parametrize("name", sorted(CONVOLUTIONS))
def test_convolutions_stream_and_keep_their_layouts(remote, name):
    # A convolution on contiguous tensors streams, forward and backward, its results laid out as
    # the devices lay them (contiguous); channels-last ones still take the daemon's answer
    # (test_conv_batch_norm_training_layouts). Fails before: each call was a batch of its own.
    import libremote

    conv, input_shape, weight_shape = CONVOLUTIONS[name]
    torch.manual_seed(0)
    host = [torch.randn(input_shape), torch.randn(weight_shape), torch.randn(weight_shape[1] if "transpose" in name
                                                                            else weight_shape[0])]
    remote_ins = [t.cuda().requires_grad_() for t in host]
    local_ins = [t.clone().requires_grad_() for t in host]
    batches = libremote.session_stats()["batches"]
    for _ in range(5):
        out = conv(*remote_ins)
        out.square().sum().backward()
    assert libremote.session_stats()["batches"] - batches <= 2, "convolutions waited for the daemon"
    for _ in range(5):
        expected = conv(*local_ins)
        expected.square().sum().backward()
    check_layout(out, expected, f"{name} output")
    for index, (got, want) in enumerate(zip(remote_ins, local_ins)):
        check_layout(got.grad, want.grad, f"{name} gradient {index}")
        torch.testing.assert_close(got.grad.cpu(), want.grad, atol=1e-4, rtol=1e-4)


def test_fused_attention_results_are_laid_out_as_promised(remote):
    # The fused attention streams (its meta kernel answers for it): every tensor it returns
    # (output, logsumexp, RNG seed and offset) must be on the daemon as the client's metadata
    # says. The CPU kernel's logsumexp is a transposed view, made contiguous by the daemon
    # (without that: strides (32, 1, 4) on the daemon against the promised (32, 8, 1)).
    query = torch.randn(2, 4, 8, 16, device="cuda")
    for q in (query, query.transpose(1, 2).contiguous().transpose(1, 2)):
        outputs = torch.ops.aten._scaled_dot_product_fused_attention_overrideable(q, q, q, None, 0.0, False, False)
        for index, out in enumerate(outputs):
            if isinstance(out, torch.Tensor):
                assert layout(out) == daemon_layout(out), f"result {index}"


def test_attention_block_gradients(remote):
    """The same block trained: every gradient autograd produces (through the fused attention
    backward, the group norm backward and the views) has local torch's layout."""
    torch.manual_seed(0)
    linear, norm = torch.nn.Linear(32, 32), torch.nn.GroupNorm(8, 32)
    x = torch.randn(1, 32, 4, 4)
    remote_linear, remote_norm = torch.nn.Linear(32, 32).cuda(), torch.nn.GroupNorm(8, 32).cuda()
    remote_linear.load_state_dict(linear.state_dict())
    remote_norm.load_state_dict(norm.state_dict())
    x_host, x_dev = x.clone().requires_grad_(), x.cuda().requires_grad_()
    _attention_block(x_host, linear, norm)["group_norm"].square().sum().backward()
    _attention_block(x_dev, remote_linear, remote_norm)["group_norm"].square().sum().backward()
    check_layout(x_dev.grad, x_host.grad, "x.grad")
    for (name, got), expected in zip(remote_linear.named_parameters(), linear.parameters()):
        check_layout(got.grad, expected.grad, f"linear.{name}.grad")
    for (name, got), expected in zip(remote_norm.named_parameters(), norm.parameters()):
        check_layout(got.grad, expected.grad, f"norm.{name}.grad")
    torch.testing.assert_close(x_dev.grad.cpu(), x_host.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_conv_batch_norm_training_layouts(remote, memory_format):
    """A conv/batch-norm/pool stack trained on a batch of one, both memory formats: outputs and
    every gradient laid out as local torch lays them out."""
    def stack() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                   torch.nn.MaxPool2d(2))

    torch.manual_seed(0)
    local, remote_stack = stack(), stack().cuda()
    remote_stack.load_state_dict(local.state_dict())
    x = torch.randn(1, 3, 10, 10).contiguous(memory_format=memory_format)
    x_host, x_dev = x.clone().requires_grad_(), _to_cuda(x).requires_grad_()
    y_host, y_dev = local(x_host), remote_stack(x_dev)
    (y_host * y_host).sum().backward()
    (y_dev * y_dev).sum().backward()
    check_layout(y_dev, y_host, "output")
    check_layout(x_dev.grad, x_host.grad, "x.grad")
    for (name, got), expected in zip(remote_stack.named_parameters(), local.parameters()):
        check_layout(got.grad, expected.grad, f"{name}.grad")


@pytest.mark.parametrize("cell", [torch.nn.LSTM, torch.nn.GRU])
def test_recurrent_layouts(remote, cell):
    """nn.LSTM / nn.GRU send fused cell ops that a CPU daemon computes from ordinary ops
    (server/translations.py): their results and gradients keep local torch's layouts."""
    torch.manual_seed(0)
    local, remote_cell = cell(8, 16, batch_first=True), cell(8, 16, batch_first=True).cuda()
    remote_cell.load_state_dict(local.state_dict())
    x = torch.randn(2, 5, 8)
    x_host, x_dev = x.clone().requires_grad_(), x.cuda().requires_grad_()
    out_host, out_dev = local(x_host)[0], remote_cell(x_dev)[0]
    out_host.sum().backward()
    out_dev.sum().backward()
    check_layout(out_dev, out_host, "output")
    check_layout(x_dev.grad, x_host.grad, "x.grad")
    for (name, got), expected in zip(remote_cell.named_parameters(), local.parameters()):
        check_layout(got.grad, expected.grad, f"{name}.grad")


def test_transfers_keep_layouts(remote):
    """``.cuda()``, ``.cpu()`` and ``.to(dtype)`` build their results' metadata outside meta
    inference (libremote/client/sync.py); each lays its result out as torch's ``_to_copy``
    (preserve_format) does, which local ``x.to(torch.float64)`` shows."""
    for name, make in {**VIEWS, **SMALL_VIEWS}.items():
        torch.manual_seed(0)
        host = make()
        expected = host.to(torch.float64).stride()
        uploaded = host.cuda()
        assert uploaded.stride() == expected == daemon_layout(uploaded)[2], f"{name}.cuda()"
        _, on_device = on_both(lambda: host)
        assert on_device.cpu().stride() == expected, f"{name}: .cpu()"
        assert on_device.to(torch.float64).stride() == expected, f"{name}: .to(float64)"


def test_batch_norm_results_as_on_cuda(remote):
    """``native_batch_norm`` on CUDA lays its output out like ``empty_like(input)`` and, in
    evaluation, saves the running statistics (shape (C,)); the CPU's kernel differs in both.
    The client says CUDA's, and the daemon's tensors are CUDA's."""
    x = torch.randn(3, 4, 5).transpose(1, 2).contiguous().transpose(1, 2)  # dense, not contiguous
    stats = (torch.randn(4), torch.rand(4) + 0.5)
    for training in (False, True):
        got = torch.native_batch_norm(_to_cuda(x), None, None, *(s.cuda() for s in stats), training, 0.1, 1e-5)
        assert got[0].stride() == torch.empty_like(x).stride() == daemon_layout(got[0])[2]
        for saved in got[1:]:
            assert tuple(saved.shape) == (4,) == daemon_layout(saved)[1]
    torch.testing.assert_close(got[0].cpu(), torch.native_batch_norm(x, None, None, *stats, True, 0.1, 1e-5)[0])


@pytest.mark.parametrize("reduction", [0, 1])
def test_loss_kernels_lay_results_out_as_on_cpu_and_cuda(remote, reduction):
    """Losses whose only meta kernel is torch's Python decomposition, which lays results out
    unlike the CPU and CUDA kernels (shared code in Loss.cpp/Loss.cu): ``mse_loss_backward``'s
    gradient is contiguous for a channels-last input (a UNet trained with ``F.mse_loss`` in
    channels-last format), ``binary_cross_entropy(reduction="none")`` keeps its input's layout."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    probabilities = torch.rand(2, 3, 4, 4).contiguous(memory_format=torch.channels_last) * 0.8 + 0.1
    target = torch.rand(2, 3, 4, 4)
    grad = torch.ones(()) if reduction else torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    calls = {
        "mse_loss_backward": lambda g, x, p, t: torch.ops.aten.mse_loss_backward(g, x, t, reduction),
        "binary_cross_entropy": lambda g, x, p, t: torch.ops.aten.binary_cross_entropy(p, t, None, reduction),
    }
    for name, call in calls.items():
        expected = call(grad, x, probabilities, target)
        got = call(*on_both(lambda: (grad, x, probabilities, target))[1])
        check_layout(got, expected, name)
        assert torch.equal(got.cpu(), expected), name
