import math

import pytest
import torch
from torch import nn

import reparam
from reparam import ConfigError
from reparam.kernels.compander import compander_reference
from reparam.methods.compander import AUTO_HEADROOM, companders
from reparam.optim import adaptive_step, param_groups, weight_decay_penalty


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3)
        self.norm = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 6 * 6, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.norm(self.conv2(x)))
        return self.fc(x.flatten(1))


def test_conv_net_outputs_unchanged_and_only_weights_parametrized():
    model = ConvNet().eval()
    x = torch.randn(4, 1, 8, 8)
    before = model(x)
    report = reparam.convert(model, {"Conv2d": {"method": "compander", "a": 1.0}, "fc": {"method": "compander"}},
                             progress=False)
    assert [r.name for r in report.layers] == ["conv1", "conv2", "fc"]
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
    assert "parametrizations" not in dict(model.norm.named_children())  # norms untouched
    assert isinstance(model.conv1.bias, nn.Parameter)  # biases untouched


def test_minilm_outputs_unchanged_right_after_wrapping(minilm):
    model = minilm.fresh_model()
    batch = minilm.heldout[0]
    before = model(**batch).last_hidden_state
    reparam.convert(model, {"Linear": {"method": "compander", "learnable": True}}, progress=False)
    # |w| reaches 7.9 in MiniLM: a="auto" puts it at half the cap, never below 0.5.
    a = [float(c.a.detach()) for _, c in companders(model)]
    assert len(a) == 37 and min(a) >= 0.5
    assert any(x > 0.5 for x in a)
    torch.testing.assert_close(model(**batch).last_hidden_state, before, rtol=1e-4, atol=1e-4)


def test_auto_a_puts_the_largest_weight_at_the_headroom():
    layer = nn.Linear(16, 16)
    with torch.no_grad():
        layer.weight[0, 0] = 7.9
    reparam.convert(nn.Sequential(layer), {"0": {"method": "compander"}}, progress=False)
    (_, compander), = companders(layer)
    assert float(compander.a.detach()) * math.pi / 2 * AUTO_HEADROOM == pytest.approx(7.9, rel=1e-6)
    small = nn.Linear(16, 16)
    with torch.no_grad():
        small.weight.mul_(0.01)
    reparam.convert(nn.Sequential(small), {"0": {"method": "compander"}}, progress=False)
    assert float(next(companders(small))[1].a.detach()) == pytest.approx(0.5)  # never below 0.5


def test_explicit_a_below_the_weights_is_an_error_naming_the_smallest_a():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with torch.no_grad():
        model[1].weight[2, 1] = -2.0
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"compander: layer '1' has \|w\| up to 2, at or above the cap "
                                          r"aπ/2 = 1.571 for a=1.0; use a > 1.273, or a='auto'"):
        reparam.convert(model, {"Linear": {"method": "compander", "a": 1.0}}, progress=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert type(model[0]) is nn.Linear and not hasattr(model[0], "parametrizations")


def test_learnable_a_b_are_positive_parameters_and_receive_gradients():
    layer = nn.Linear(8, 4)
    reparam.convert(nn.Sequential(layer), {"0": {"method": "compander", "learnable": True, "a": 2.0}},
                    progress=False)
    compander = layer.parametrizations.weight[0]
    layer(torch.randn(3, 8)).sum().backward()
    assert compander.log_a.grad is not None and compander.log_b.grad is not None
    with torch.no_grad():
        compander.log_a.fill_(-30.0)
    assert float(compander.a.detach()) > 0


def test_weight_decay_rules():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    reparam.convert(model, {"0": {"method": "compander", "a": 2.0},
                            "1": {"method": "compander", "a": 2.0, "learnable": True}}, progress=False)
    decay, no_decay, ab = param_groups(model, 0.1, ab_lr=1e-3)
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    learned = model[1].parametrizations.weight
    assert ids(decay) == {id(learned.original)}
    assert ids(no_decay) == {id(model[0].parametrizations.weight.original), id(model[0].bias), id(model[1].bias)}
    assert ids(ab) == {id(learned[0].log_a), id(learned[0].log_b)}
    assert (decay["weight_decay"], no_decay["weight_decay"], ab["weight_decay"], ab["lr"]) == (0.1, 0.0, 0.0, 1e-3)
    # The penalty is on Ψ(v) of the fixed layer only.
    torch.testing.assert_close(weight_decay_penalty(model, 0.1), 0.05 * model[0].weight.square().sum())


class _RMSNorm(nn.Module):  # a transformers-style norm: not a torch class, its name ends in "Norm"
    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))


def test_param_groups_follow_trainer_convention():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), _RMSNorm(8), nn.Linear(8, 4, bias=False))
    reparam.convert(model, {"3": {"method": "scale_vector"}}, progress=False)
    groups = param_groups(model, 0.1)
    assert len(groups) == 2  # no compander: the a/b group would be empty and is left out
    decay, no_decay = ({id(p) for p in g["params"]} for g in groups)
    assert decay == {id(model[0].weight), id(model[3].parametrizations.weight.original)}
    scales = model[3].parametrizations.weight[0]
    assert no_decay == {id(model[0].bias), id(model[1].weight), id(model[1].bias), id(model[2].weight),
                        *(id(p) for p in scales.parameters())}
    frozen = nn.Linear(4, 4)
    frozen.requires_grad_(False)
    assert param_groups(frozen, 0.1) == []  # frozen parameters are not handed to the optimizer


def test_adaptive_step_scales_the_step_by_the_slope():
    layer = nn.Linear(6, 5)
    reparam.convert(nn.Sequential(layer), {"0": {"method": "compander", "a": 2.0}}, progress=False)
    v = layer.parametrizations.weight.original
    compander = layer.parametrizations.weight[0]
    before = v.detach().clone()
    layer(torch.randn(4, 6)).square().sum().backward()
    grad_w = v.grad / compander.slope(before)  # ∂L/∂Ψ
    optimizer = torch.optim.SGD([v], lr=0.1)
    adaptive_step(optimizer, layer)
    # SGD on ∂L/∂Ψ, times Ψ'(v): v ← v − lr·∂L/∂Ψ·Ψ'(v).
    torch.testing.assert_close(v.detach(), before - 0.1 * grad_w * compander.slope(before))


def test_save_load_round_trip_and_fold(tmp_path):
    model = ConvNet().eval()
    reparam.convert(model, {"Conv2d": {"method": "compander", "learnable": True}}, progress=False)
    with torch.no_grad():
        model.conv1.parametrizations.weight[0].log_a.add_(0.3)  # "trained" a
    x = torch.randn(2, 1, 8, 8)
    reparam.save(model, tmp_path / "m.safetensors")
    fresh = ConvNet().eval()
    reparam.load(fresh, tmp_path / "m.safetensors")
    assert torch.equal(fresh(x), model(x))
    expected = model(x)
    assert reparam.fold(model) == ["conv1", "conv2"]
    assert type(model.conv1.weight) is nn.Parameter and not hasattr(model.conv1, "reparam_config")
    torch.testing.assert_close(model(x), expected)


def test_cpu_path_equals_the_kernel_reference():
    layer = nn.Linear(8, 8)
    reparam.convert(nn.Sequential(layer), {"0": {"method": "compander", "a": 1.5, "b": 0.7}}, progress=False)
    c = layer.parametrizations.weight[0]
    v = layer.parametrizations.weight.original
    assert torch.equal(layer.weight, compander_reference(v, c.a, c.b))


def test_wrapping_one_layer_with_apply():
    layer = nn.Linear(8, 8)
    x = torch.randn(2, 8)
    before = layer(x)
    assert reparam.apply(layer, {"method": "compander", "learnable": True}) is layer
    torch.testing.assert_close(layer(x), before)
    assert isinstance(layer.parametrizations.weight[0].log_a, nn.Parameter)
    with pytest.raises(ConfigError, match=r"method 'compander' supports \['Linear', 'Conv1d', 'Conv2d', 'Conv3d'\], "
                                          "not LayerNorm"):
        reparam.apply(nn.LayerNorm(8), {"method": "compander"})


@pytest.mark.parametrize("values, message", [
    # Issue 12, item 4: each of these once NaN'd (or inf'd) the whole layer.
    ({"a": math.inf}, r"compander: a=inf must be a number in \[0.001, 1000.0\]"),
    ({"a": 1e300}, r"compander: a=1e\+300 must be a number in \[0.001, 1000.0\]"),
    ({"a": math.nan}, r"compander: a=nan must be a number in \[0.001, 1000.0\]"),
    ({"b": 1e308}, r"compander: b=1e\+308 must be a number in \[0.001, 1000.0\]"),
    ({"b": 1e-300}, r"compander: b=1e-300 must be a number in \[0.001, 1000.0\]"),
    ({"b": 0}, r"compander: b=0 must be a number in \[0.001, 1000.0\]"),
])
def test_a_and_b_outside_their_range_are_refused(values, message):
    model = nn.Sequential(nn.Linear(4, 4))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=message):
        reparam.convert(model, {"0": {"method": "compander", **values}}, progress=False)
    assert type(model[0]) is nn.Linear and all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_auto_a_beyond_the_range_is_refused():
    layer = nn.Linear(4, 4)
    with torch.no_grad():
        layer.weight[0, 0] = 1e4
    with pytest.raises(ConfigError, match=r"layer '0' has \|w\| up to 1e\+04, so a='auto' would exceed a's range "
                                          r"\[0.001, 1000.0\]"):
        reparam.convert(nn.Sequential(layer), {"0": {"method": "compander"}}, progress=False)


@pytest.mark.parametrize("key, value, message", [
    ("log_a", 100.0, r"log_a=100 makes a = exp\(log_a\) zero or infinite in torch.float32"),
    ("log_b", -200.0, r"log_b=-200 makes b = exp\(log_b\) zero or infinite in torch.float32"),
    ("log_b", math.inf, r"'0.parametrizations.weight.0.log_b' holds NaN or Inf"),
])
def test_load_refuses_a_and_b_that_would_nan_the_layer(tmp_path, key, value, message):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    model = nn.Sequential(nn.Linear(4, 4))
    reparam.convert(model, {"0": {"method": "compander", "learnable": True}}, progress=False)
    reparam.save(model, tmp_path / "m.safetensors")
    tensors = load_file(tmp_path / "m.safetensors")
    tensors[f"0.parametrizations.weight.0.{key}"].fill_(value)
    with safe_open(tmp_path / "m.safetensors", framework="pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if k != "reparam.sha256"}  # as a hand edit would
        save_file(tensors, tmp_path / "bad.safetensors", metadata=metadata)
    fresh = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(reparam.FileFormatError, match=message):
        reparam.load(fresh, tmp_path / "bad.safetensors")
    assert type(fresh[0]) is nn.Linear and not hasattr(fresh[0], "parametrizations")


def test_reconverting_a_companded_layer_says_it_is_converted():
    model = nn.Sequential(nn.Linear(4, 4))
    reparam.convert(model, {"0": {"method": "compander"}}, progress=False)
    # Issue 12, item 14: this once suggested "e.g. '0.*' for the layers inside".
    with pytest.raises(ConfigError, match=r"pattern '0' selects 1 module\(s\) already converted with "
                                          r"\['compander'\]; a layer takes one method"):
        reparam.convert(model, {"0": {"method": "low_rank", "rank": 2}}, progress=False)
