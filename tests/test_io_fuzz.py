"""Property: whatever happens to a saved file, ``load`` either reproduces the
saved model's outputs exactly or raises ``FileFormatError`` and leaves the
model exactly as it was (state dict and module classes). Never anything else.

Random small models (Linear layers in a Sequential or a ModuleDict, random
widths), random data-free recipes, and one random damage per file: cut
short, a flipped byte in the header or the data, a tensor cast, dropped or
added, the metadata JSON edited; rewritten files keep or lose the checksum.
"""
import json
import os

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import reparam

# 80 examples take ~5-10 s; raise it locally to hunt longer (1,000 passed with a random seed when written).
MAX_EXAMPLES = int(os.environ.get("REPARAM_FUZZ_EXAMPLES", 80))
WIDTHS = st.sampled_from([3, 8, 16, 24, 40])


class Chain(nn.Module):
    """Linear layers in a ModuleDict, applied in order."""

    def __init__(self, widths, bias):
        super().__init__()
        self.layers = nn.ModuleDict({f"l{i}": nn.Linear(a, b, bias=bias)
                                     for i, (a, b) in enumerate(zip(widths, widths[1:]))})

    def forward(self, x):
        for layer in self.layers.values():
            x = torch.relu(layer(x))
        return x


def build(spec, seed):
    torch.manual_seed(seed)
    kind, widths, bias = spec
    if kind == "dict":
        return Chain(widths, bias)
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b, bias=bias), nn.Tanh()]
    return nn.Sequential(*layers)


@st.composite
def layer_config(draw, in_features, out_features):
    small = min(in_features, out_features)
    options = [None,
               {"method": "low_rank", "rank": draw(st.integers(1, small))},
               {"method": "affine", "bits": draw(st.integers(2, 8)), "group_size": 32, "fit": "rtn",
                "symmetric": draw(st.booleans())},
               {"method": "shift_add", "bits": draw(st.integers(2, 4)), "group_size": 32, "fit": "rtn",
                "scale": draw(st.sampled_from(["pow2", "float"]))}]
    atoms = draw(st.integers(1, small))
    options.append({"method": "dense_sparse", "atoms": atoms, "nnz": draw(st.integers(1, atoms)),
                    "factorizer": "plain"})
    return draw(st.sampled_from(options))


@st.composite
def model_and_recipe(draw):
    widths = draw(st.lists(WIDTHS, min_size=2, max_size=4))
    spec = (draw(st.sampled_from(["seq", "dict"])), widths, draw(st.booleans()))
    model = build(spec, 0)
    recipe = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            config = draw(layer_config(module.in_features, module.out_features))
            if config is not None:
                recipe[name] = config
    return spec, recipe


JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 45, 2 ** 45), st.just(2 ** 40),
                        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
                        st.lists(st.integers(0, 9), max_size=3), st.just({}))


@st.composite
def damage(draw):
    kind = draw(st.sampled_from(["none", "truncate", "flip_header", "flip_data", "dtype", "drop", "add",
                                 "metadata", "config_value"]))
    return kind, draw(st.randoms(use_true_random=False))


def damaged_copy(path, out, kind, rng, values):
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    if kind == "truncate":
        out.write_bytes(data[:rng.randrange(len(data))])
        return
    if kind in ("flip_header", "flip_data"):
        position = rng.randrange(header_end) if kind == "flip_header" else rng.randrange(header_end, len(data))
        data = data[:position] + bytes([data[position] ^ rng.randrange(1, 256)]) + data[position + 1:]
        out.write_bytes(data)
        return
    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    key = rng.choice(sorted(tensors))
    if kind == "dtype":
        dtype = rng.choice([torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int32])
        tensors[key] = tensors[key].to(dtype)
    elif kind == "drop":
        del tensors[key]
    elif kind == "add":
        tensors[key + rng.choice(["", "_x", ".extra"]) + "2"] = torch.zeros(rng.randrange(1, 4))
    elif kind == "metadata":
        field = rng.choice(sorted(metadata))
        text = metadata[field]
        cut = rng.randrange(len(text) + 1)
        metadata[field] = rng.choice([text[:cut], text[:cut] + rng.choice('{}[]",:0x-') + text[cut:],
                                      json.dumps(values), ""])
    elif kind == "config_value":
        modules = json.loads(metadata["reparam.modules"])
        if modules:
            name = rng.choice(sorted(modules))
            modules[name][rng.choice(sorted(modules[name]))] = values
        metadata["reparam.modules"] = json.dumps(modules)
    if rng.random() < 0.5:  # as a hand edit or another writer would: the other checks must hold alone
        metadata.pop("reparam.sha256", None)
    save_file(tensors, out, metadata=metadata)


@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(model_and_recipe(), damage(), JSON_VALUES)
def test_load_is_exact_or_refuses_cleanly(tmp_path_factory, case, harm, values):
    (spec, recipe), (kind, rng) = case, harm
    tmp = tmp_path_factory.mktemp("fuzz")
    model = build(spec, 0)
    if recipe:
        reparam.convert(model, recipe, progress=False)
    reparam.save(model, tmp / "good.safetensors")
    damaged_copy(tmp / "good.safetensors", tmp / "bad.safetensors", kind, rng, values)

    fresh = build(spec, 1)
    state = {k: v.clone() for k, v in fresh.state_dict().items()}
    types = [type(m) for m in fresh.modules()]
    x = torch.randn(5, spec[1][0])
    try:
        reparam.load(fresh, tmp / "bad.safetensors")
    except reparam.FileFormatError:
        event(f"{kind}: refused")
        assert [type(m) for m in fresh.modules()] == types
        assert fresh.state_dict().keys() == state.keys()
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())
    else:
        event(f"{kind}: loaded")
        with torch.no_grad():
            assert torch.equal(fresh(x), model(x))

