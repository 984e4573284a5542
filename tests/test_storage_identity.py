"""Storage identity of remote tensors: views share one storage, as on CUDA.

Checkpoint code finds tied tensors by storage: safetensors and accelerate group a state dict by
``(device, untyped_storage().data_ptr(), untyped_storage().nbytes())`` and check
``data_ptr()`` against the storage's. Each check here is one that code relies on; the
safetensors tests run the library's own functions on remote tensors.
"""

from __future__ import annotations

import zipfile

import pytest
import torch

CUDA = torch.device("cuda", 0)


def storage_ptr(tensor: torch.Tensor) -> int:
    """What safetensors (``storage_ptr``) and accelerate (``id_tensor_storage``) call a tensor's
    storage."""
    return tensor.untyped_storage().data_ptr()


def test_storage_data_ptr_works_and_is_shared_by_views(remote):
    base = torch.randn(4, 6, device="cuda")
    storage = base.untyped_storage()
    assert storage.data_ptr() != 0
    assert storage.nbytes() == 4 * 6 * 4 and storage.size() == storage.nbytes()
    assert storage.device == CUDA and storage.is_cuda
    views = {
        "slice": base[1:], "view": base.view(24), "transpose": base.t(), "step": base[:, ::2],
        "select": base[2], "unbind": base.unbind(0)[3], "split": base.split(1)[1], "detach": base.detach(),
        "reshape_view": base.reshape(2, 12), "expand": base[:1].expand(3, 6), "diagonal": base.diagonal(),
        "view_of_view": base[1:].t()[2:],
    }
    for name, view in views.items():
        assert view.untyped_storage() is storage, name
        assert storage_ptr(view) == storage.data_ptr(), name
        assert view.untyped_storage()._cdata == storage._cdata, name
        # data_ptr arithmetic as on CUDA: the storage's address plus the offset in bytes.
        assert view.data_ptr() == storage.data_ptr() + view.storage_offset() * view.element_size(), name


def test_distinct_tensors_have_distinct_storages(remote):
    a = torch.randn(3, device="cuda")
    b = torch.randn(3, device="cuda")
    results = [a, b, a + 1, a.clone(), a.contiguous().clone(), torch.empty_like(a)]
    pointers = {storage_ptr(t) for t in results}
    assert len(pointers) == len(results)
    assert len({t.data_ptr() for t in results}) == len(results)
    # A result of an in-place op is its input, storage and all.
    c = a.clone()
    assert storage_ptr(c.add_(1)) == storage_ptr(c)


def test_data_pointers_as_on_cuda(remote):
    """The same arithmetic code does on CUDA tensors (safetensors' ``_end_ptr``: the last
    element's data_ptr plus its size)."""
    base = torch.randn(5, 4, device="cuda")
    row = base[2]
    assert row.data_ptr() - base.data_ptr() == 2 * 4 * 4
    assert row.view(-1)[-1].data_ptr() + 4 - base.data_ptr() == 3 * 4 * 4
    assert base[1:].data_ptr() == base.data_ptr() + 16
    half = torch.randn(8, dtype=torch.float16, device="cuda")
    assert half[3:].data_ptr() == half.data_ptr() + 6


def test_parameter_data_and_rebinding_share_storage(remote):
    param = torch.nn.Parameter(torch.randn(3, device="cuda"))
    assert param.data.untyped_storage() is param.untyped_storage()
    other = torch.randn(3, device="cuda")
    param.data = other
    assert storage_ptr(param) == storage_ptr(other)


def test_resize_grows_the_storage(remote):
    t = torch.empty(0, device="cuda")
    t.resize_(10)
    assert t.untyped_storage().nbytes() == 40
    view = t[2:]
    view_storage = view.untyped_storage()
    assert view_storage is t.untyped_storage() and view_storage.nbytes() == 40


def test_storage_never_reads_remote_bytes(remote):
    storage = torch.randn(4, device="cuda").untyped_storage()
    for read in (storage.tolist, storage.cpu, lambda: storage[0]):
        with pytest.raises(RuntimeError, match="remote storage"):
            read()
    typed = torch.randn(4, device="cuda").storage()  # the deprecated TypedStorage wraps it
    assert typed.size() == 4 and typed.data_ptr() != 0


def test_safetensors_finds_tied_weights(remote):
    import safetensors.torch as safetensors_torch
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False)).cuda()
    model[1].weight = model[0].weight  # tied, as language models tie embeddings
    state = model.state_dict()
    shared = [names for names in safetensors_torch._find_shared_tensors(state) if len(names) > 1]
    assert shared == [{"0.weight", "1.weight"}]
    # As on CUDA: save_file refuses shared tensors, save_model drops the duplicate.
    with pytest.raises(RuntimeError, match="share memory"):
        safetensors_torch.save_file(state, "/dev/null")
    separate = {"a": torch.randn(2, device="cuda"), "b": torch.randn(2, device="cuda")}
    assert all(len(names) == 1 for names in safetensors_torch._find_shared_tensors(separate))


def test_safetensors_save_model_round_trip(remote, tmp_path):
    import safetensors.torch as safetensors_torch
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False)).cuda()
    model[1].weight = model[0].weight
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_model(model, str(path))
    loaded = safetensors_torch.load_file(str(path))
    assert len(loaded) == 1
    (name, value), = loaded.items()
    torch.testing.assert_close(value, model[0].weight.detach().cpu())
    # Views that are not the whole storage are incomplete: safetensors saves them as copies.
    partial = {"whole": model[0].weight, "rows": model[0].weight[2:]}
    assert not safetensors_torch._is_complete(partial["rows"])
    assert safetensors_torch._is_complete(partial["whole"])


def test_torch_save_still_works(remote, tmp_path):
    base = torch.randn(4, 4, device="cuda")
    path = tmp_path / "t.pt"
    torch.save({"base": base, "view": base[1:]}, path)
    loaded = torch.load(path)
    torch.testing.assert_close(loaded["base"].cpu(), base.cpu())
    torch.testing.assert_close(loaded["view"].cpu(), base[1:].cpu())


def tied_state() -> dict[str, torch.Tensor]:
    """A state dict as a tied model writes it: one Parameter under two names, plus views (a row,
    a strided column, a transpose) of another tensor."""
    weight = torch.nn.Parameter(torch.randn(5, 3, device="cuda"))
    base = torch.arange(24.0, device="cuda").reshape(4, 6)
    return {"embed": weight, "head": weight, "whole": base, "row": base[1], "column": base[:, 2], "t": base.t()}


def test_torch_save_writes_each_shared_storage_once_as_on_cuda(remote, tmp_path):
    """torch.save writes one storage per CUDA storage; tensors sharing it load sharing it
    (plain torch on CPU: the tie in a checkpoint survives, as accelerate's save_state needs)."""
    state = tied_state()
    path = tmp_path / "tied.pt"
    torch.save(state, path)
    loaded = torch.load(path, map_location="cpu")
    assert loaded["embed"] is loaded["head"]
    assert {storage_ptr(loaded[name]) for name in ("whole", "row", "column", "t")} == {storage_ptr(loaded["whole"])}
    for name, value in state.items():
        assert loaded[name].storage_offset() == value.storage_offset(), name
        assert loaded[name].stride() == value.stride(), name
        torch.testing.assert_close(loaded[name], value.detach().cpu(), msg=name)
    with zipfile.ZipFile(path) as archive:
        assert len([n for n in archive.namelist() if "/data/" in n]) == 2  # two storages, as on CUDA


def test_torch_load_to_cuda_keeps_shared_storages(remote, tmp_path):
    """Loading back onto the device: views of one saved storage are views of one device storage
    (writing through one shows in the others), as torch.load does on CUDA."""
    state = tied_state()
    path = tmp_path / "tied.pt"
    torch.save(state, path)
    loaded = torch.load(path)
    assert loaded["embed"] is loaded["head"] and loaded["embed"].device == CUDA
    storages = {name: loaded[name].untyped_storage() for name in ("whole", "row", "column", "t")}
    assert all(storage is storages["whole"] for storage in storages.values())
    for name, value in state.items():
        assert loaded[name].stride() == value.stride(), name
        torch.testing.assert_close(loaded[name].cpu(), value.detach().cpu(), msg=name)
    loaded["whole"][1, 2] = -1.0
    assert loaded["row"][2].item() == loaded["column"][1].item() == loaded["t"][2, 1].item() == -1.0
    # Rebuilt as torch.load rebuilds: no autograd view behind them, so in-place use with grad works.
    assert all(value._base is None for value in loaded.values())
    loaded["row"].add_(torch.ones(6, device="cuda", requires_grad=True))
    assert loaded["column"][1].item() == 0.0


def test_set_moves_the_tensor_onto_the_source_storage(remote):
    """``x.set_(y)``: x now uses y's storage (one storage, as on CUDA); views taken of x before
    keep the old one, and ``x.set_()`` gives x a new empty storage."""
    x = torch.arange(5.0, device="cuda")
    old_view = x[1:]
    y = torch.arange(100.0, device="cuda")
    x.set_(y)
    assert x.untyped_storage() is y.untyped_storage() and storage_ptr(x) == storage_ptr(y)
    assert old_view.untyped_storage() is not y.untyped_storage()
    assert old_view.untyped_storage().nbytes() == 5 * 4  # the old storage did not grow to y's size
    x.set_()
    assert x.untyped_storage() is not y.untyped_storage() and x.untyped_storage().nbytes() == 0


def test_torch_save_after_set(remote, tmp_path):
    """Saving writes whole storages: each tensor's must be the daemon's real one, also after
    ``set_`` put a tensor on a smaller storage (the old one would be read past its end)."""
    x = torch.arange(100.0, device="cuda")
    old_view = x[90:]
    x.set_(torch.arange(5.0, device="cuda"))
    path = tmp_path / "set.pt"
    torch.save({"x": x, "old_view": old_view}, path)
    loaded = torch.load(path, map_location="cpu")
    torch.testing.assert_close(loaded["x"], torch.arange(5.0))
    torch.testing.assert_close(loaded["old_view"], torch.arange(90.0, 100.0))
