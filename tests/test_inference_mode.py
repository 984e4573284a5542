"""``torch.inference_mode()`` and ``torch.no_grad()`` on remote tensors, against plain local torch.

Each scenario runs twice, on local CPU tensors and on ``cuda`` (the daemon), and records per step
what torch made of it: the values, ``is_inference()``, ``requires_grad``, or the error torch
raised (its type and first line). The two records must be equal. Views of ordinary tensors taken
inside inference mode are normal tensors sharing their base's version counter (BERT slices its
``position_ids`` buffer there: sentence-transformers' ``encode()``, Hugging Face pipelines and
Lightning's validate/test/predict all do); functional results are inference tensors, which
autograd later refuses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

aten = torch.ops.aten


def outcome(fn: Callable[[], Any]) -> Any:
    """What running ``fn`` gave, comparably across devices."""
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - the error itself is what is compared
        return ("raises", type(exc).__name__, str(exc).splitlines()[0][:100])
    return describe(result)


def describe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        with torch.no_grad():
            values = value.detach().cpu().tolist()
        return ("tensor", value.dtype, tuple(value.shape), value.is_inference(), value.requires_grad, values)
    if isinstance(value, (list, tuple)):
        return tuple(describe(item) for item in value)
    return value


def compare(scenario: Callable[[str], dict[str, Any]]) -> None:
    local, remote = scenario("cpu"), scenario("cuda")
    assert local.keys() == remote.keys()
    differences = {key: (local[key], remote[key]) for key in local if local[key] != remote[key]}
    assert not differences, "\n".join(f"{key}:\n  local  {a}\n  remote {b}" for key, (a, b) in differences.items())


def base_values() -> torch.Tensor:
    return torch.randn(4, 4, generator=torch.Generator().manual_seed(0))


def test_views_of_normal_tensors_inside_inference_mode(remote):
    """The issue's minimal case and every kind of view of a normal tensor."""

    def scenario(device: str) -> dict[str, Any]:
        buf = torch.arange(16).expand(1, -1).to(device)
        x = base_values().to(device)
        w = base_values().to(device).requires_grad_()
        out = {}
        with torch.inference_mode():
            out["buffer slice"] = outcome(lambda: buf[:, 0:5])
            out["slice"] = outcome(lambda: x[:, 1:3])
            out["view"] = outcome(lambda: x.view(16))
            out["add"] = outcome(lambda: x + 1)
            out["select"] = outcome(lambda: x[1, 2])
            out["t"] = outcome(lambda: x.t())
            out["detach"] = outcome(lambda: x.detach())
            out["split"] = outcome(lambda: x.split(2))
            out["unbind"] = outcome(lambda: x.unbind(0))
            out["chunk, narrow, movedim, mT, unflatten, reshape, flatten"] = outcome(lambda: (
                x.chunk(2), x.narrow(0, 1, 2), x.movedim(0, 1), x.mT, x.unflatten(1, (2, 2)), x.reshape(2, 8),
                x.flatten(), x.contiguous()))
            out["view of a parameter"] = outcome(lambda: w[0])
            out["view of a parameter, then math"] = outcome(lambda: w.view(16) * 2)
            out["view of a view"] = outcome(lambda: x[1:3].t()[0])
            out["view of a new tensor"] = outcome(lambda: (x * 3)[0:2])
            out["index, masked (new tensors)"] = outcome(lambda: (x[[0, 2]], x[x > 0], torch.nonzero(x > 0)))
        return out

    compare(scenario)


#: Every strided view op of torch 2.13 that reaches the op path (not CompositeImplicitAutograd).
VIEW_OPS: dict[str, Callable[[torch.Tensor, torch.Tensor], Any]] = {
    "alias": lambda x, c: aten.alias(x),
    "as_strided": lambda x, c: aten.as_strided(x, (2, 2), (1, 2)),
    "_reshape_alias": lambda x, c: aten._reshape_alias(x, [16], [1]),
    "detach": lambda x, c: aten.detach(x),
    "diagonal": lambda x, c: aten.diagonal(x),
    "expand": lambda x, c: aten.expand(x, [2, 4, 4]),
    "permute": lambda x, c: aten.permute(x, [1, 0]),
    "select": lambda x, c: aten.select(x, 0, 1),
    "slice": lambda x, c: aten.slice(x, 0, 1, 3),
    "split": lambda x, c: aten.split(x, 2),
    "split_with_sizes": lambda x, c: aten.split_with_sizes(x, [1, 3]),
    "squeeze": lambda x, c: aten.squeeze(x),
    "squeeze.dim": lambda x, c: aten.squeeze(x, 0),
    "squeeze.dims": lambda x, c: aten.squeeze(x, [0]),
    "t": lambda x, c: aten.t(x),
    "transpose": lambda x, c: aten.transpose(x, 0, 1),
    "unbind": lambda x, c: aten.unbind(x),
    "unfold": lambda x, c: aten.unfold(x, 0, 2, 1),
    "unsqueeze": lambda x, c: aten.unsqueeze(x, 0),
    "view": lambda x, c: aten.view(x, [16]),
    "view.dtype": lambda x, c: aten.view.dtype(x, torch.int32),  # made afresh: the mode decides
    "view.dtype, same dtype": lambda x, c: aten.view.dtype(x, torch.float32),
    "view_as_complex": lambda x, c: aten.view_as_complex(aten.view(x, [8, 2])),
    "view_as_real": lambda x, c: aten.view_as_real(c),
    "_conj": lambda x, c: aten._conj(c),
    "_neg_view": lambda x, c: aten._neg_view(x),
    "_unsafe_view": lambda x, c: aten._unsafe_view(x, [16]),
}


def test_every_view_op_takes_the_inference_state_torch_gives_it(remote):
    """A view of a normal tensor inside inference mode, and of an inference tensor outside it:
    ATen builds most views from their base's dispatch keys (the base decides), ``view.dtype`` as a
    new tensor (the mode decides)."""

    def scenario(device: str) -> dict[str, Any]:
        x = base_values().to(device)
        c = torch.randn(4, dtype=torch.complex64, generator=torch.Generator().manual_seed(1)).to(device)
        with torch.inference_mode():
            xi, ci = x.clone(), c.clone()
        out = {}
        for name, view in VIEW_OPS.items():
            with torch.inference_mode():
                out[f"{name} of a normal tensor, inside"] = outcome(lambda: view(x, c))
            out[f"{name} of an inference tensor, outside"] = outcome(lambda: view(xi, ci))
        return out

    compare(scenario)


def test_in_place_and_out_inside_inference_mode(remote):
    def scenario(device: str) -> dict[str, Any]:
        z = base_values().to(device)
        rows = z[1:3]
        out_tensor = torch.empty(4, 4, device=device)
        out = {}
        with torch.inference_mode():
            out["add_ on a normal tensor"] = outcome(lambda: z.add_(1))
            out["mul_ on its view"] = outcome(lambda: rows.mul_(2))
            out["base after"] = outcome(lambda: z)
            out["setitem"] = outcome(lambda: z.__setitem__((0, slice(None)), 5.0))
            out["fill_ of a view of a view"] = outcome(lambda: z.view(16)[0:2].fill_(7))
            out["unsqueeze_, squeeze_, t_ keep it normal"] = outcome(lambda: (
                z.unsqueeze_(0).shape, z.squeeze_(0).shape, z.t_(), z.is_inference()))
            out["out= a normal tensor"] = outcome(lambda: (torch.mul(z, 2, out=out_tensor), out_tensor.is_inference()))
            fresh = base_values().to(device)
            out["resize_ of an inference tensor"] = outcome(lambda: (fresh.resize_(2, 8), fresh.is_inference()))
        out["version counter bumped inside"] = outcome(lambda: z._version > 0)
        return out

    compare(scenario)


def test_inference_tensors_outside_inference_mode(remote):
    """What torch refuses later: in-place updates of inference tensors, saving them for backward,
    ``requires_grad_``, and modifying a view made in inference mode of a tensor autograd tracks."""

    def scenario(device: str) -> dict[str, Any]:
        x = base_values().to(device)
        w = base_values().to(device).requires_grad_()
        with torch.inference_mode():
            t = x * 3
            rows = t[0:2]
            b = w * 1  # made inside: an inference tensor too
        out = {
            "inference tensor": outcome(lambda: t),
            "view of it": outcome(lambda: rows),
            "view taken outside": outcome(lambda: t[1:3]),
            "add_ outside": outcome(lambda: t.add_(1)),
            "add_ on its view outside": outcome(lambda: rows.add_(1)),
            "functional op outside": outcome(lambda: t + 1),
            "saved for backward": outcome(lambda: (t * w).sum()),
            "saved for backward (mm)": outcome(lambda: (t @ w).sum()),
            "requires_grad_": outcome(lambda: t.requires_grad_()),
            "inference product of a parameter": outcome(lambda: b),
            "a clone trains": outcome(lambda: (t.clone().add_(1) * w).sum()),
        }

        tracked = w * 1
        with torch.inference_mode():
            view = tracked[0:2]
        out["inference-mode view of a tracked tensor"] = outcome(lambda: (view._base is tracked, view.requires_grad))
        out["used outside: trains"] = outcome(lambda: (view * 2).sum())
        out["modified in place outside"] = outcome(lambda: view.mul_(2))

        def backward_through_view() -> Any:
            y = w * 2
            with torch.inference_mode():
                head = y[0]
            (head * 3).sum().backward()
            return w.grad
        out["backward through it"] = outcome(backward_through_view)
        return out

    compare(scenario)


def test_views_under_no_grad(remote):
    def scenario(device: str) -> dict[str, Any]:
        w = base_values().to(device).requires_grad_()
        out = {}

        def modified_later() -> Any:
            y = w * 1
            with torch.no_grad():
                rows = y[0:2]
            rows.mul_(2)
        out["no_grad view modified with grad on"] = outcome(modified_later)

        def leaf_view_modified_later() -> Any:
            with torch.no_grad():
                flat = w.view(16)
            flat.add_(1)
        out["no_grad view of a leaf modified with grad on"] = outcome(leaf_view_modified_later)

        def read_after_rebase() -> Any:
            y = w * 1
            with torch.no_grad():
                rows = y[0:2]
                rows.mul_(1)
            return rows.double()
        out["no_grad view changed in place, then used"] = outcome(read_after_rebase)

        def views() -> Any:
            with torch.no_grad():
                rows, flat = w[1:3], w.view(16)
                return rows.is_leaf, rows.grad_fn is None, flat.requires_grad, rows.t()._base is w, w * 2
        out["views and ops"] = outcome(views)

        def used_later() -> Any:
            with torch.no_grad():
                flat = w.view(16)
            return (flat * 2).sum()
        out["no_grad view used with grad on"] = outcome(used_later)

        def nested() -> Any:
            with torch.inference_mode():
                with torch.inference_mode(False):
                    return (w[0:2] * 2).sum()
        out["inference_mode(False) inside"] = outcome(nested)
        return out

    compare(scenario)


def test_bert_forward_under_inference_mode(remote):
    """sentence-transformers' encode() and Hugging Face pipelines run BERT like this."""
    import transformers
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.inference_mode():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
    model.cuda()
    with torch.inference_mode():
        got = model(input_ids=ids.cuda(), attention_mask=mask.cuda()).last_hidden_state
    assert got.is_cuda and got.is_inference()
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-5)


def test_data_assignment_between_inference_and_normal_tensors(remote):
    """``p.data = q`` across inference-ness: torch keeps ``p``'s version counter (so whether an
    in-place update of ``p`` raises stays as it was) and copies ``q``'s keys; a PrivateUse1 tensor
    keeps its own keys (see ``tensor.rebind``), so only ``p.is_inference()`` is not compared."""

    def scenario(device: str) -> dict[str, Any]:
        normal = torch.zeros(4, device=device)
        with torch.inference_mode():
            inference = torch.ones(4, device=device)
            other = torch.full((4,), 2.0, device=device)
        normal_target = torch.zeros(4, device=device)
        normal_target.data = inference
        inference.data = torch.full((4,), 3.0, device=device)
        with torch.inference_mode():
            normal.data = other
        return {
            "normal <- inference": outcome(lambda: (normal_target.tolist(), normal_target.add_(1).tolist())),
            "inference <- normal": outcome(lambda: (inference.tolist(), inference.add_(1))),
            "inside inference mode": outcome(lambda: (normal.tolist(), normal.mul_(2).tolist())),
        }

    compare(scenario)
