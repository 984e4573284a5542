"""nn functional layers (convolution, pooling, normalisation, losses, interpolation,
padding) through libremote, checked against plain local torch on the CPU.

Each test builds host tensors, computes the expected answer locally, computes the same with the
tensors on ``cuda`` (the libremote daemon), brings the result back with ``.cpu()`` and compares
(tests/op_checks.py). Split from tests/test_ops.py by subject; the numbered sections keep their
numbers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from op_checks import TOL, check, compare, gen, randint, randn, to_host

# ==============================================================================================
# 4. nn functional layers
# ==============================================================================================
CONVS = {
    "conv1d": (lambda x, w, b: F.conv1d(x, w, b), [(2, 3, 10), (4, 3, 3), (4,)]),
    "conv1d_stride_pad_dil": (lambda x, w, b: F.conv1d(x, w, b, stride=2, padding=2, dilation=2), [(2, 3, 11), (4, 3, 3), (4,)]),
    "conv1d_groups": (lambda x, w: F.conv1d(x, w, groups=2), [(2, 4, 9), (6, 2, 3)]),
    "conv2d": (lambda x, w, b: F.conv2d(x, w, b), [(2, 3, 8, 8), (5, 3, 3, 3), (5,)]),
    "conv2d_stride_pad": (lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1), [(2, 3, 9, 7), (4, 3, 3, 3), (4,)]),
    "conv2d_asym_stride_pad": (lambda x, w: F.conv2d(x, w, stride=(1, 2), padding=(2, 0)), [(1, 2, 7, 8), (3, 2, 3, 2)]),
    "conv2d_same": (lambda x, w: F.conv2d(x, w, padding="same"), [(1, 3, 7, 7), (2, 3, 3, 3)]),
    "conv2d_groups": (lambda x, w, b: F.conv2d(x, w, b, groups=2), [(2, 4, 6, 6), (6, 2, 3, 3), (6,)]),
    "conv2d_depthwise": (lambda x, w: F.conv2d(x, w, groups=4, padding=1), [(2, 4, 6, 6), (4, 1, 3, 3)]),
    "conv2d_dilation": (lambda x, w: F.conv2d(x, w, dilation=2, padding=2), [(1, 3, 9, 9), (2, 3, 3, 3)]),
    "conv3d": (lambda x, w: F.conv3d(x, w, padding=1), [(1, 2, 4, 5, 5), (3, 2, 3, 3, 3)]),
    "conv_transpose1d": (lambda x, w: F.conv_transpose1d(x, w, stride=2), [(2, 3, 5), (3, 4, 3)]),
    "conv_transpose2d": (lambda x, w, b: F.conv_transpose2d(x, w, b), [(2, 3, 5, 5), (3, 4, 3, 3), (4,)]),
    "conv_transpose2d_stride_pad_outpad": (
        lambda x, w, b: F.conv_transpose2d(x, w, b, stride=2, padding=1, output_padding=1), [(2, 3, 5, 4), (3, 4, 3, 3), (4,)]
    ),
    "conv_transpose2d_groups_dil": (
        lambda x, w: F.conv_transpose2d(x, w, groups=2, dilation=2), [(1, 4, 5, 5), (4, 3, 3, 3)]
    ),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", sorted(CONVS))
def test_convolutions(remote, name, dtype):
    fn, shapes = CONVS[name]
    check(fn, *[randn(*s, seed=i, dtype=dtype) for i, s in enumerate(shapes)], **TOL[dtype])


def test_conv2d_channels_last_input(remote):
    x = randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    w = randn(4, 3, 3, 3, seed=1)
    got, expected = check(lambda a, b: F.conv2d(a, b, padding=1), x, w, atol=1e-4, rtol=1e-4)


def test_conv_modules(remote):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 6, 3, padding=1, groups=3)
    x = randn(2, 3, 7, 7)
    expected = conv(x)
    conv_dev = conv.cuda()
    got = conv_dev(x.cuda())
    compare(got.cpu(), expected.detach(), atol=1e-5, rtol=1e-5)


POOLS = {
    "max_pool2d": lambda x: F.max_pool2d(x, 2),
    "max_pool2d_stride_pad": lambda x: F.max_pool2d(x, 3, stride=2, padding=1),
    "max_pool2d_ceil_dil": lambda x: F.max_pool2d(x, 2, stride=2, ceil_mode=True, dilation=1),
    "max_pool2d_indices": lambda x: F.max_pool2d(x, 2, return_indices=True),
    "max_pool1d": lambda x: F.max_pool1d(x.flatten(2), 3),
    "avg_pool2d": lambda x: F.avg_pool2d(x, 2),
    "avg_pool2d_pad_no_count": lambda x: F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False),
    "avg_pool2d_ceil": lambda x: F.avg_pool2d(x, 2, ceil_mode=True),
    "adaptive_avg_pool2d": lambda x: F.adaptive_avg_pool2d(x, (3, 2)),
    "adaptive_avg_pool2d_1": lambda x: F.adaptive_avg_pool2d(x, 1),
    "adaptive_max_pool2d": lambda x: F.adaptive_max_pool2d(x, (2, 3)),
    "avg_pool1d": lambda x: F.avg_pool1d(x.flatten(2), 4),
    "lp_pool2d": lambda x: F.lp_pool2d(x, 2, 2),
}


@pytest.mark.parametrize("name", sorted(POOLS))
def test_pooling(remote, name):
    check(POOLS[name], randn(2, 3, 7, 9))


@pytest.mark.parametrize("momentum", [0.1, 0.5])
def test_batch_norm_training_updates_running_stats_in_place(remote, momentum):
    x = randn(4, 3, 5, 5) * 2 + 1
    weight, bias = randn(3, seed=1), randn(3, seed=2)
    rm, rv = torch.zeros(3), torch.ones(3)
    rm_d, rv_d = rm.cuda(), rv.cuda()
    expected = F.batch_norm(x, rm, rv, weight, bias, training=True, momentum=momentum)
    got = F.batch_norm(x.cuda(), rm_d, rv_d, weight.cuda(), bias.cuda(), training=True, momentum=momentum)
    compare(got.cpu(), expected, atol=1e-5, rtol=1e-5)
    # The running statistics were updated in place on the daemon, as they are locally.
    compare(rm_d.cpu(), rm, atol=1e-6, rtol=1e-5)
    compare(rv_d.cpu(), rv, atol=1e-6, rtol=1e-5)
    assert not torch.equal(rm_d.cpu(), torch.zeros(3))


def test_batch_norm_eval_uses_running_stats(remote):
    x = randn(4, 3, 5, 5)
    rm, rv = randn(3, seed=1), randn(3, seed=2).abs() + 0.5
    w, b = randn(3, seed=3), randn(3, seed=4)
    rm_d, rv_d = rm.cuda(), rv.cuda()
    expected = F.batch_norm(x, rm, rv, w, b, training=False)
    got = F.batch_norm(x.cuda(), rm_d, rv_d, w.cuda(), b.cuda(), training=False)
    compare(got.cpu(), expected, atol=1e-5, rtol=1e-5)
    compare(rm_d.cpu(), rm, exact=True)  # eval mode leaves them alone
    compare(rv_d.cpu(), rv, exact=True)


def test_batch_norm_module_train_then_eval(remote):
    bn = torch.nn.BatchNorm2d(3)
    bn_dev = torch.nn.BatchNorm2d(3).cuda()
    for step in range(3):
        x = randn(4, 3, 4, 4, seed=step) * (step + 1)
        compare(bn_dev(x.cuda()).detach().cpu(), bn(x).detach(), atol=1e-5, rtol=1e-5)
    compare(bn_dev.running_mean.cpu(), bn.running_mean, atol=1e-5, rtol=1e-5)
    compare(bn_dev.running_var.cpu(), bn.running_var, atol=1e-5, rtol=1e-5)
    assert int(bn_dev.num_batches_tracked.cpu()) == int(bn.num_batches_tracked) == 3
    bn.eval()
    bn_dev.eval()
    x = randn(2, 3, 4, 4, seed=9)
    compare(bn_dev(x.cuda()).detach().cpu(), bn(x).detach(), atol=1e-5, rtol=1e-5)


def test_batch_norm_1d(remote):
    x = randn(8, 5)
    rm, rv = torch.zeros(5), torch.ones(5)
    rm_d, rv_d = rm.cuda(), rv.cuda()
    compare(F.batch_norm(x.cuda(), rm_d, rv_d, training=True).cpu(), F.batch_norm(x, rm, rv, training=True), atol=1e-5, rtol=1e-5)
    compare(rm_d.cpu(), rm, atol=1e-6, rtol=1e-5)


NORMS = {
    "layer_norm": (lambda x, w, b: F.layer_norm(x, (6,), w, b), [(3, 4, 6), (6,), (6,)]),
    "layer_norm_2d_shape": (lambda x: F.layer_norm(x, (4, 6)), [(3, 4, 6)]),
    "group_norm": (lambda x, w, b: F.group_norm(x, 2, w, b), [(2, 4, 3, 3), (4,), (4,)]),
    "group_norm_no_affine": (lambda x: F.group_norm(x, 4), [(2, 8, 5)]),
    "instance_norm": (lambda x: F.instance_norm(x), [(2, 3, 5, 5)]),
    "instance_norm_affine": (lambda x, w, b: F.instance_norm(x, weight=w, bias=b), [(2, 3, 5, 5), (3,), (3,)]),
    "rms_norm": (lambda x, w: F.rms_norm(x, (6,), w), [(3, 4, 6), (6,)]),
    "normalize": (lambda x: F.normalize(x, dim=1), [(4, 5)]),
    "local_response_norm": (lambda x: F.local_response_norm(x, 2), [(2, 4, 3, 3)]),
}


@pytest.mark.parametrize("name", sorted(NORMS))
def test_normalization(remote, name):
    fn, shapes = NORMS[name]
    check(fn, *[randn(*s, seed=i) for i, s in enumerate(shapes)], atol=1e-5, rtol=1e-5)


def test_instance_norm_with_running_stats(remote):
    x = randn(2, 3, 4, 4) + 2
    rm, rv = torch.zeros(3), torch.ones(3)
    rm_d, rv_d = rm.cuda(), rv.cuda()
    expected = F.instance_norm(x, rm, rv, use_input_stats=True, momentum=0.2)
    got = F.instance_norm(x.cuda(), rm_d, rv_d, use_input_stats=True, momentum=0.2)
    compare(got.cpu(), expected, atol=1e-5, rtol=1e-5)
    compare(rm_d.cpu(), rm, atol=1e-6, rtol=1e-5)
    compare(rv_d.cpu(), rv, atol=1e-6, rtol=1e-5)


def test_embedding(remote):
    weight = randn(10, 4)
    idx = torch.tensor([[0, 2, 9], [3, 3, 1]])
    check(F.embedding, idx, weight, exact=True)
    check(lambda i, w: F.embedding(i, w, padding_idx=3), idx, weight, exact=True)
    check(lambda i, w: F.embedding(i, w.clone(), max_norm=1.0), idx, weight, atol=1e-6, rtol=1e-5)
    check(lambda i, w, o: F.embedding_bag(i.flatten(), w, o, mode="mean"), idx, weight, torch.tensor([0, 2, 5]))
    emb = torch.nn.Embedding(10, 4)
    emb_dev = torch.nn.Embedding(10, 4).cuda()
    emb_dev.weight.data.copy_(emb.weight.data)
    compare(emb_dev(idx.cuda()).detach().cpu(), emb(idx).detach(), exact=True)


def test_embedding_max_norm_renormalizes_weight_in_place(remote):
    weight = randn(10, 4) * 3
    idx = torch.tensor([1, 4, 4, 7])
    w_dev = weight.cuda()
    F.embedding(idx, weight, max_norm=1.0)
    F.embedding(idx.cuda(), w_dev, max_norm=1.0)
    compare(w_dev.cpu(), weight, atol=1e-6, rtol=1e-5)


def test_dropout_eval_is_identity(remote):
    x = randn(5, 6)
    check(lambda t: F.dropout(t, 0.5, training=False), x, exact=True)
    check(lambda t: F.dropout2d(t.view(5, 6, 1, 1), 0.5, training=False), x, exact=True)
    drop = torch.nn.Dropout(0.7).eval()
    check(drop, x, exact=True)


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_softmax_family(remote, dim):
    x = randn(3, 4, 5) * 3
    check(lambda t: F.softmax(t, dim), x)
    check(lambda t: F.log_softmax(t, dim), x)
    check(lambda t: torch.softmax(t, dim, dtype=torch.float64), x)
    check(lambda t: F.softmin(t, dim), x)
    check(lambda t: F.gumbel_softmax(t, tau=1.0, hard=False).shape, x)  # shape only (random)


def test_softmax_half_precision(remote):
    x = randn(4, 8) * 3
    check(lambda t: F.softmax(t.bfloat16(), -1), x, atol=1e-2, rtol=1e-2)


LOSSES = {
    "cross_entropy": lambda logits, target, *_: F.cross_entropy(logits, target),
    "cross_entropy_sum": lambda logits, target, *_: F.cross_entropy(logits, target, reduction="sum"),
    "cross_entropy_none": lambda logits, target, *_: F.cross_entropy(logits, target, reduction="none"),
    "cross_entropy_weight": lambda logits, target, w, *_: F.cross_entropy(logits, target, weight=w),
    "cross_entropy_ignore_index": lambda logits, target, *_: F.cross_entropy(logits, target, ignore_index=2),
    "cross_entropy_label_smoothing": lambda logits, target, *_: F.cross_entropy(logits, target, label_smoothing=0.1),
    "cross_entropy_probs": lambda logits, target, w, probs: F.cross_entropy(logits, probs),
    "nll_loss": lambda logits, target, *_: F.nll_loss(F.log_softmax(logits, 1), target),
    "nll_loss_weight_none": lambda logits, target, w, *_: F.nll_loss(F.log_softmax(logits, 1), target, weight=w, reduction="none"),
    "mse_loss": lambda logits, target, w, probs: F.mse_loss(logits, probs),
    "mse_loss_sum": lambda logits, target, w, probs: F.mse_loss(logits, probs, reduction="sum"),
    "l1_loss": lambda logits, target, w, probs: F.l1_loss(logits, probs),
    "smooth_l1_loss": lambda logits, target, w, probs: F.smooth_l1_loss(logits, probs * 3),
    "huber_loss": lambda logits, target, w, probs: F.huber_loss(logits, probs, delta=0.5),
    "bce_with_logits": lambda logits, target, w, probs: F.binary_cross_entropy_with_logits(logits, probs),
    "bce": lambda logits, target, w, probs: F.binary_cross_entropy(torch.sigmoid(logits), probs),
    "kl_div": lambda logits, target, w, probs: F.kl_div(F.log_softmax(logits, 1), probs, reduction="batchmean"),
    "cosine_similarity": lambda logits, target, w, probs: F.cosine_similarity(logits, probs),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses(remote, name):
    logits = randn(6, 5) * 2
    target = randint(0, 5, (6,))
    weight = randn(5, seed=3).abs() + 0.1
    probs = F.softmax(randn(6, 5, seed=4), 1)
    check(LOSSES[name], logits, target, weight, probs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lengths_on", ["host", "device", "list"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ctc_loss_and_its_gradient(remote, lengths_on, reduction):
    # Length tensors usually stay on the host (CUDA accepts them there); torch's path for tensor
    # subclasses would divide by them on the device (libremote/client/ctc_loss.py).
    log_probs = F.log_softmax(randn(12, 3, 6), 2)
    targets = randint(1, 6, (3, 5))
    lengths = {"input_lengths": [12, 10, 7], "target_lengths": [5, 3, 4]}
    if lengths_on != "list":
        lengths = {name: torch.tensor(value) for name, value in lengths.items()}

    def loss_and_grad(log_probs, targets, on_device):
        log_probs = log_probs.detach().requires_grad_()
        given = {name: value.cuda() if on_device and lengths_on == "device" else value
                 for name, value in lengths.items()}
        loss = F.ctc_loss(log_probs, targets, **given, reduction=reduction)
        loss.sum().backward()
        return loss.detach(), log_probs.grad

    expected = loss_and_grad(log_probs, targets, on_device=False)
    got = to_host(loss_and_grad(log_probs.cuda(), targets.cuda(), on_device=True))
    compare(got, expected, atol=1e-5, rtol=1e-5)


def test_cross_entropy_spatial(remote):
    logits = randn(2, 4, 3, 3)
    target = randint(0, 4, (2, 3, 3))
    check(F.cross_entropy, logits, target, atol=1e-5, rtol=1e-5)


INTERPOLATE = {
    "nearest_scale": lambda x: F.interpolate(x, scale_factor=2, mode="nearest"),
    "nearest_size": lambda x: F.interpolate(x, size=(7, 5), mode="nearest"),
    "nearest_exact": lambda x: F.interpolate(x, size=(7, 5), mode="nearest-exact"),
    "bilinear": lambda x: F.interpolate(x, scale_factor=2, mode="bilinear"),
    "bilinear_align": lambda x: F.interpolate(x, size=(9, 11), mode="bilinear", align_corners=True),
    "bilinear_down": lambda x: F.interpolate(x, size=(2, 3), mode="bilinear"),
    "bilinear_antialias": lambda x: F.interpolate(x, size=(2, 3), mode="bilinear", antialias=True),
    "bicubic": lambda x: F.interpolate(x, scale_factor=1.5, mode="bicubic"),
    "linear_1d": lambda x: F.interpolate(x.flatten(2), scale_factor=2, mode="linear"),
    "upsample_module": lambda x: torch.nn.Upsample(scale_factor=2)(x),
}


@pytest.mark.parametrize("name", sorted(INTERPOLATE))
def test_interpolate(remote, name):
    check(INTERPOLATE[name], randn(2, 3, 4, 5), atol=1e-5, rtol=1e-5)


PADS = {
    "constant": lambda x: F.pad(x, (1, 2)),
    "constant_value": lambda x: F.pad(x, (1, 1, 2, 0), value=-3.5),
    "constant_negative": lambda x: F.pad(x, (-1, 1, 0, -2)),
    "reflect": lambda x: F.pad(x, (2, 1, 1, 2), mode="reflect"),
    "replicate": lambda x: F.pad(x, (2, 1, 1, 2), mode="replicate"),
    "circular": lambda x: F.pad(x, (2, 1, 1, 2), mode="circular"),
    "constant_3dims": lambda x: F.pad(x, (1, 1, 1, 1, 1, 1)),
}


@pytest.mark.parametrize("name", sorted(PADS))
def test_pad(remote, name):
    check(PADS[name], randn(2, 3, 4, 5), exact=True)


@pytest.mark.parametrize(
    "variant", ["plain", "causal", "bool_mask", "float_mask", "scale", "gqa_shapes", "dropout_eval", "lq_ne_lk_causal"]
)
def test_scaled_dot_product_attention(remote, variant):
    q, k, v = randn(2, 3, 5, 8), randn(2, 3, 5, 8, seed=1), randn(2, 3, 5, 8, seed=2)
    kwargs = {}
    if variant == "causal":
        kwargs = dict(is_causal=True)
    elif variant == "bool_mask":
        kwargs = dict(attn_mask=(torch.rand(5, 5, generator=gen(3)) > 0.3) | torch.eye(5, dtype=torch.bool))
    elif variant == "float_mask":
        kwargs = dict(attn_mask=randn(2, 1, 5, 5, seed=4))
    elif variant == "scale":
        kwargs = dict(scale=0.3)
    elif variant == "gqa_shapes":
        q = randn(2, 3, 4, 8)
    elif variant == "lq_ne_lk_causal":
        q = randn(2, 3, 3, 8)
        kwargs = dict(is_causal=True)
    check(lambda a, b, c, **kw: F.scaled_dot_product_attention(a, b, c, **kw), q, k, v, atol=1e-5, rtol=1e-5, **kwargs)


def test_attention_streams_with_the_other_ops(remote):
    # The fused attention's forward and backward go out with the step's other ops: a training
    # step waits for the daemon once, not at every attention layer. (Fails before: the client
    # dropped the forward's meta kernel with torch's Python ones, so each call waited for the
    # daemon's answer, a batch of its own.)
    import libremote

    q, k, v = (randn(2, 3, 5, 8, seed=seed).cuda().requires_grad_() for seed in range(3))
    batches = libremote.session_stats()["batches"]
    for _ in range(10):
        F.scaled_dot_product_attention(q, k, v).sum().backward()
    assert libremote.session_stats()["batches"] - batches <= 2  # (the stats query is one)
    expected = [randn(2, 3, 5, 8, seed=seed).requires_grad_() for seed in range(3)]
    for _ in range(10):
        F.scaled_dot_product_attention(*expected).sum().backward()
    for got, want in zip((q, k, v), expected):
        compare(got.grad.cpu(), want.grad, atol=1e-5, rtol=1e-5)


def test_multihead_attention_module(remote):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    x = randn(2, 5, 8)
    mask = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    out, weights = mha(x, x, x, attn_mask=mask)
    mha.cuda()
    out_d, weights_d = mha(x.cuda(), x.cuda(), x.cuda(), attn_mask=mask.cuda())
    compare(out_d.detach().cpu(), out.detach(), atol=1e-5, rtol=1e-5)
    compare(weights_d.detach().cpu(), weights.detach(), atol=1e-5, rtol=1e-5)


def test_misc_functional(remote):
    x = randn(2, 4, 6, 6)
    check(lambda t: F.pixel_shuffle(t, 2), x, exact=True)
    check(lambda t: F.pixel_unshuffle(t, 2), x, exact=True)
    check(lambda t: F.unfold(t, 3, padding=1), x, exact=True)
    check(lambda t: F.fold(F.unfold(t, 2, stride=2), (6, 6), 2, stride=2), x, exact=True)
    check(lambda t: F.one_hot(t, 5), torch.tensor([0, 3, 4, 1]), exact=True)
    check(lambda t: F.glu(t, 1), x)
    check(lambda t, w: F.prelu(t, w), x, torch.full((4,), 0.25))
    check(lambda t: torch.nn.functional.hardswish(t), x)
