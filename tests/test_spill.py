"""Originals of swapped-out layers spilled to a temporary file during a
conversion (reparam.spill): exact restore on failure, files always removed."""
import os
import tempfile

import pytest
import torch
from torch import nn

import reparam
from reparam import LowRankLinear

WHITENED = {"method": "low_rank", "rank": 2, "factorizer": "whitened"}


class Block(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class Stack(nn.Module):
    def __init__(self, blocks=3):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(blocks))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def shared_stack():
    """Tensors a spill must leave in memory: a bias Parameter shared by two converted
    layers, a bias also held by the model itself, and two weights that are views of one storage."""
    torch.manual_seed(0)
    model = Stack()
    model.blocks[2].up.bias = model.blocks[0].up.bias = nn.Parameter(torch.randn(16))
    model.extra_bias = model.blocks[1].down.bias  # the same Parameter in a module that is not converted
    flat = torch.randn(2 * 16 * 8)
    model.blocks[1].up.weight = nn.Parameter(flat[:128].view(16, 8))
    model.blocks[2].up.weight = nn.Parameter(flat[128:].view(16, 8))
    return model


def calib():
    torch.manual_seed(1)
    return [torch.randn(4, 8) for _ in range(3)]


@pytest.fixture
def temp_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def tensors(model):
    """Every parameter and buffer object by name, and a copy of its value."""
    named = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    return {k: (t, t.detach().clone()) for k, t in named.items()}


def assert_restored(model, before, modules):
    after = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    assert list(after) == list(before)
    for key, (obj, value) in before.items():
        assert after[key] is obj, key  # the same Parameter objects, not copies
        assert torch.equal(after[key], value), key
    assert list(model.modules()) == modules


def fail_at(monkeypatch, n, during=None):
    """Make the n-th LowRankLinear fit raise; ``during()`` runs just before it does."""
    fit, calls = LowRankLinear.fit, []

    def failing_fit(self, weight, stats):
        calls.append(1)
        if len(calls) == n:
            if during is not None:
                during()
            raise RuntimeError("boom")
        fit(self, weight, stats)

    monkeypatch.setattr(LowRankLinear, "fit", failing_fit)
    return calls


def spill_files(folder):
    return sorted(p.name for p in folder.glob("reparam-swapped-*/*.safetensors"))


def test_failure_restores_spilled_and_shared_tensors_exactly(monkeypatch, temp_dir):
    model = shared_stack()
    before, modules = tensors(model), list(model.modules())
    seen = {}

    def during():  # at the 5th fit blocks.0 and blocks.1 are swapped
        seen["files"] = spill_files(temp_dir)
        seen["sizes"] = {k: t.numel() for k, (t, _) in before.items()}

    fail_at(monkeypatch, 5, during)
    with pytest.raises(RuntimeError, match="boom"):
        reparam.convert(model, {"blocks.*": WHITENED}, calib=calib(), pipeline="sequential", progress=False)
    # Spilled: tensors nothing else uses. Kept: the biases shared with blocks.2.up and with the model,
    # the weight views. One file per replaced layer (each had something to spill).
    assert seen["files"] == ["0.safetensors", "1.safetensors", "2.safetensors", "3.safetensors"]
    emptied = sorted(k for k, n in seen["sizes"].items() if n == 0)
    assert emptied == ["blocks.0.down.bias", "blocks.0.down.weight", "blocks.0.up.weight", "blocks.1.down.weight",
                       "blocks.1.up.bias"]
    assert_restored(model, before, modules)
    # Restored values live in torch's own memory, not in a mapping of the deleted file.
    assert all(t.untyped_storage().resizable() for t in model.parameters())
    assert model.blocks[0].up.bias is model.blocks[2].up.bias and model.blocks[1].down.bias is model.extra_bias
    up1, up2 = model.blocks[1].up.weight, model.blocks[2].up.weight
    assert up1.untyped_storage().data_ptr() == up2.untyped_storage().data_ptr()  # still views of one tensor
    assert list(temp_dir.iterdir()) == []


def test_success_removes_the_spill_folder(monkeypatch, temp_dir):
    model = Stack()
    replaced = model.blocks[0].up
    seen = []
    fit = LowRankLinear.fit

    def watching_fit(self, weight, stats):
        seen.append(spill_files(temp_dir))
        fit(self, weight, stats)

    monkeypatch.setattr(LowRankLinear, "fit", watching_fit)
    reparam.convert(model, {"blocks.*": WHITENED}, calib=calib(), pipeline="sequential", progress=False)
    assert [len(files) for files in seen] == [0, 1, 2, 3, 4, 5]  # one file per replaced layer, so far
    assert replaced.weight.numel() == 0  # the replaced module's tensors were freed, not kept in memory
    assert list(temp_dir.iterdir()) == []


def test_unreadable_spill_file_still_undoes_every_other_swap(monkeypatch, temp_dir):
    model = Stack()
    before, modules = tensors(model), list(model.modules())
    first = model.blocks[0].up

    def delete_first_file():
        os.remove(next(temp_dir.glob("reparam-swapped-*/0.safetensors")))

    fail_at(monkeypatch, 4, delete_first_file)
    with pytest.raises(RuntimeError, match=r"the conversion failed and the original tensors of 1 module\(s\), "
                                           r"e.g. 'blocks.0.up', could not be read back .* reload the model") as err:
        reparam.convert(model, {"blocks.*": WHITENED}, calib=calib(), pipeline="sequential", progress=False)
    chain, cause = [], err.value
    while cause is not None:
        chain.append(str(cause))
        cause = cause.__cause__ or cause.__context__
    assert "boom" in chain  # the conversion's own error stays in the chain
    assert list(model.modules()) == modules and model.blocks[0].up is first
    assert first.weight.numel() == 0 and first.bias.numel() == 0
    for key, (obj, value) in before.items():
        if not key.startswith("blocks.0.up."):
            assert torch.equal(dict(model.named_parameters())[key], value), key
    assert list(temp_dir.iterdir()) == []


def test_unwritable_temp_dir_keeps_originals_in_memory_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    model = Stack()
    before, modules = tensors(model), list(model.modules())
    fail_at(monkeypatch, 4)
    with pytest.warns(UserWarning, match=r"could not write the swapped-out layers to a temporary file .*"
                                         r"Set TMPDIR to a writable folder"):
        with pytest.raises(RuntimeError, match="boom"):
            reparam.convert(model, {"blocks.*": WHITENED}, calib=calib(), pipeline="sequential", progress=False)
    assert_restored(model, before, modules)
