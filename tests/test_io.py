import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import reparam
from reparam import LowRankLinear


class Net(nn.Module):
    def __init__(self, dtype=torch.float32, device=None, hidden=32):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.embed = nn.Embedding(10, 16, **kw)
        self.encoder = nn.Sequential(nn.Linear(16, hidden, **kw), nn.ReLU(), nn.Linear(hidden, 16, **kw))
        self.head = nn.Linear(16, 10, bias=False, **kw)
        self.head.weight = self.embed.weight  # tied, as in language models

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)))


RECIPE = {"encoder.*": {"method": "low_rank", "rank": 4}}
TOKENS = torch.tensor([[1, 2, 3, 9], [4, 5, 6, 0]])


def converted(dtype=torch.float32):
    model = Net(dtype)
    reparam.convert(model, RECIPE, progress=False)
    return model


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_exact(tmp_path, dtype):
    model = converted(dtype)
    path = tmp_path / "model.safetensors"
    reparam.save(model, path)
    fresh = Net(dtype)
    reparam.load(fresh, path)
    assert isinstance(fresh.encoder[0], LowRankLinear) and fresh.encoder[0].u.dtype == dtype
    assert fresh.head.weight is fresh.embed.weight  # the tie survives
    assert torch.equal(fresh(TOKENS), model(TOKENS))


def test_load_into_meta_model(tmp_path):
    model = converted()
    path = tmp_path / "model.safetensors"
    reparam.save(model, path)
    fresh = Net(device="meta")
    reparam.load(fresh, path)
    assert all(t.device.type == "cpu" for t in fresh.state_dict().values())
    assert torch.equal(fresh(TOKENS), model(TOKENS))


def test_metadata_holds_format_and_configs(tmp_path):
    path = tmp_path / "model.safetensors"
    reparam.save(converted(), path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["reparam.format"] == "1"
    assert json.loads(meta["reparam.modules"])["encoder.0"] == {
        "method": "low_rank", "size_ratio": None, "rank": 4, "factorizer": "auto", "asvd_alpha": 0.5}
    assert json.loads(meta["reparam.aliases"]) == {"head.weight": "embed.weight"}
    assert "encoder.0.u" in keys and "encoder.0.weight" not in keys


def test_file_bytes_are_the_compressed_bytes(tmp_path):
    model = converted()
    path = tmp_path / "model.safetensors"
    reparam.save(model, path)
    with open(path, "rb") as f:
        header = 8 + int.from_bytes(f.read(8), "little")  # safetensors: u64 length + JSON header
    tied = model.embed.weight.numel() * 4  # stored once
    stored = sum(t.numel() * t.element_size() for t in model.state_dict().values()) - tied
    assert os.path.getsize(path) - header == stored
    assert stored < sum(t.numel() * 4 for t in Net().state_dict().values()) - tied


def rewrite(path, out, *, drop=None, add=None, reshape=None, meta=None):
    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    if drop:
        del tensors[drop]
    if add:
        tensors[add] = torch.zeros(1)
    if reshape:
        tensors[reshape] = torch.zeros(3, 3)
    metadata.update(meta or {})
    save_file(tensors, out, metadata=metadata)
    return out


@pytest.mark.parametrize("change, message", [
    (dict(drop="encoder.0.u"), r"missing keys \['encoder.0.u'\]"),
    (dict(add="encoder.9.u"), r"unexpected keys \['encoder.9.u'\]"),
    (dict(reshape="encoder.2.v"), r"'encoder.2.v' has shape \(3, 3\) in the file and \(4, 32\) in the model"),
    (dict(meta={"reparam.format": "7"}), "file format version 7 is newer than this reparam's 1; upgrade reparam"),
    (dict(meta={"reparam.modules": json.dumps({"encoder.0": {"method": "warp", "x": 1}})}),
     "unknown method 'warp'"),
    (dict(meta={"reparam.modules": json.dumps({"decoder.0": {"method": "low_rank", "rank": 4}})}),
     "converts module 'decoder.0', which this model does not have"),
    (dict(meta={"reparam.modules": json.dumps({"encoder.1": {"method": "low_rank", "rank": 4}})}),
     r"converts 'encoder.1' with 'low_rank', which supports \['Linear', 'Conv1D'\], but here it is a ReLU"),
])
def test_mismatched_file_raises_and_leaves_model_as_it_was(tmp_path, change, message):
    good = tmp_path / "good.safetensors"
    reparam.save(converted(), good)
    bad = rewrite(good, tmp_path / "bad.safetensors", **change)
    fresh = Net()
    state, types = snapshot(fresh)
    with pytest.raises(Exception, match=message):
        reparam.load(fresh, bad)
    assert [type(m) for m in fresh.modules()] == types
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())


def test_plain_safetensors_file_is_refused(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="was not written by reparam.save"):
        reparam.load(Net(), tmp_path / "plain.safetensors")
