"""transformers' Conv1D (GPT-2's Linear with its weight stored (in, out)) under every compression method."""
import pytest
import torch
from torch import nn

import reparam

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

CONFIGS = [
    {"method": "low_rank", "rank": 4},
    {"method": "dense_sparse", "size_ratio": 0.5},
    {"method": "shift_add", "bits": 3, "group_size": 32},
    {"method": "affine", "bits": 4, "group_size": 32},
]


def tiny_gpt2():
    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c["method"])
def test_conv1d_converts_exactly_like_the_equivalent_linear(config):
    torch.manual_seed(0)
    conv = Conv1D(48, 32)  # in 32, out 48
    nn.init.normal_(conv.bias)
    linear = nn.Linear(32, 48)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    from_conv, from_linear = reparam.apply(conv, config), reparam.apply(linear, config)
    assert (from_conv.in_features, from_conv.out_features) == (32, 48)
    for key, value in from_linear.state_dict().items():
        assert torch.equal(from_conv.state_dict()[key], value), key


def test_gpt2_conv1d_layers_calibrated_sequentially_save_and_load():
    model = tiny_gpt2()
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        dense = model(ids).logits
    calib = [torch.randint(0, 64, (2, 12)) for _ in range(4)]
    report = reparam.convert(model, {"Conv1D": {"method": "affine", "bits": 4, "group_size": 32, "fit": "gptq"}},
                             calib=calib, pipeline="sequential", progress=False)
    assert len(report.layers) == 8 and all(r.output_error < 0.15 for r in report.layers)
    with torch.no_grad():
        converted = model(ids).logits
    torch.testing.assert_close(converted, dense, atol=0.1, rtol=0)
    path = f"{pytest.importorskip('tempfile').mkdtemp()}/gpt2.safetensors"
    reparam.save(model, path)
    fresh = reparam.load(tiny_gpt2(), path)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, converted)


def test_linear_rule_on_gpt2_says_what_it_left_untouched():
    model = tiny_gpt2()
    with pytest.warns(UserWarning) as caught:
        report = reparam.convert(model, {"Linear": {"method": "low_rank", "rank": 2}}, progress=False)
    messages = [str(w.message) for w in caught]
    assert any("layer 'lm_head' shares its weight with 'transformer.wte' (tied weights)" in m for m in messages)
    assert any("the rule for class 'Linear' left 8 transformers Conv1D layer(s) untouched" in m for m in messages)
    assert report.layers == [] and report.untouched == {"Conv1D": 8, "Linear": 1}
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.transformer.wte.weight
