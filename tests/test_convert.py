import copy

import pytest
import torch
from torch import nn

import reparam
from reparam import ConfigError, LowRankLinear


class Net(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(16, 32, dtype=dtype), nn.GELU(), nn.Linear(32, 16, dtype=dtype))
        self.norm = nn.LayerNorm(16, dtype=dtype)
        self.head = nn.Linear(16, 4, dtype=dtype)

    def forward(self, x):
        return self.head(self.norm(self.encoder(x)))


LR = {"method": "low_rank", "rank": 4}


def calib(n=4):
    return [torch.randn(8, 16) for _ in range(n)]


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def assert_unchanged(model, before):
    state, types = before
    after = model.state_dict()
    assert list(after) == list(state)
    for key in state:
        assert torch.equal(after[key], state[key]), key
    assert [type(m) for m in model.modules()] == types


@pytest.mark.parametrize("recipe, calibration, message", [
    ({"encoder.3": LR}, None, r"pattern 'encoder.3' matches no module; close module names: \['encoder.2', 'encoder.1', 'encoder.0'"),
    ({"encoder": LR}, None,
     r"pattern 'encoder' selects 1 module\(s\) of type \['Sequential'\], but method 'low_rank' supports only "
     r"\['Linear', 'Conv1D'\]; select those layers, e.g. 'encoder.\*'"),
    ({"norm": LR}, None, r"of type \['LayerNorm'\], but method 'low_rank' supports only \['Linear', 'Conv1D'\]"),
    ({"Linear": {"method": "nope"}}, None, r"unknown method 'nope'; known methods are"),
    ({"Linear": {"method": "low_rank", "rank": 4, "bits": 3}}, None, r"unknown key\(s\) \['bits'\]"),
    ({"Linear": {"method": "low_rank", "rank": 8}}, None,
     r"rank=8 exceeds min\(in, out\)=4 of layer 'head'; lower the rank or use size_ratio"),
    ({"Linear": {"method": "low_rank", "rank": 2, "factorizer": "whitened"}}, None,
     r"3 layer\(s\), e.g. 'encoder.0' .* need calibration data; pass calib=<a few batches of model inputs>"),
])
def test_errors_name_the_fix_and_leave_model_unchanged(recipe, calibration, message):
    model = Net()
    before = snapshot(model)
    with pytest.raises(ConfigError, match=message):
        reparam.convert(model, recipe, calib=calibration, progress=False)
    assert_unchanged(model, before)


def test_nan_weight_is_an_error_before_anything_changes():
    model = Net()
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"layer 'head' has NaN or Inf weights; fix or exclude it \(add a rule 'head': None"):
        reparam.convert(model, {"Linear": LR}, progress=False)
    state, types = before
    assert [type(m) for m in model.modules()] == types
    assert torch.equal(model.encoder[0].weight, state["encoder.0.weight"])


def test_failure_midway_rolls_back_every_swap(monkeypatch):
    model = Net()
    before = snapshot(model)
    fit = LowRankLinear.fit
    calls = []

    def failing_fit(self, weight, stats):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        fit(self, weight, stats)

    monkeypatch.setattr(LowRankLinear, "fit", failing_fit)
    with pytest.raises(RuntimeError, match="boom"):
        reparam.convert(model, {"Linear": LR}, progress=False)
    assert len(calls) == 3
    assert_unchanged(model, before)


def test_not_strict_warns_and_converts_the_rest():
    model = Net()
    with pytest.warns(UserWarning, match="matches no module"):
        report = reparam.convert(model, {"missing.layer": LR, "head": LR}, strict=False, progress=False)
    assert [r.name for r in report.layers] == ["head"]
    assert isinstance(model.head, LowRankLinear)


def test_report_sizes_and_output_error_from_calibration():
    model = Net()
    original = model.encoder[0].weight.detach().clone()
    data = calib()
    report = reparam.convert(model, {"encoder.*": {"method": "low_rank", "rank": 4}}, calib=data,
                             progress=False)
    first = report.layers[0]
    assert (first.name, first.method) == ("encoder.0", "low_rank")
    assert (first.params_before, first.params_after) == (32 * 16 + 32, 4 * (32 + 16) + 32)
    assert (first.bytes_before, first.bytes_after) == (4 * first.params_before, 4 * first.params_after)
    x = torch.cat(data)
    expected = ((x @ (original - model.encoder[0].weight).T).norm() / (x @ original.T).norm()).item()
    assert first.output_error == pytest.approx(expected, rel=1e-4)
    text = str(report)
    assert "encoder.0" in text and "total" in text and "2 layers" in text


def test_calibration_accepts_tuples_and_dicts():
    class KwNet(Net):
        def forward(self, x, scale=1.0):
            return super().forward(x * scale)

    recipe = {"head": {"method": "low_rank", "rank": 2, "factorizer": "whitened"}}
    errors = []
    for data in ([(x,) for x in calib()], [{"x": x, "scale": 1.0} for x in calib()], calib()):
        errors.append(reparam.convert(KwNet(), recipe, calib=data, progress=False).layers[0].output_error)
    assert all(e is not None and 0 < e < 1 for e in errors)


def test_attention_mask_drops_padding_from_statistics():
    layer = nn.Linear(4, 4)
    model = nn.Sequential(layer)
    x = torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input, attention_mask):
            return self.inner(input)

    stats = reparam.collect_stats(Masked(), [{"input": x, "attention_mask": mask}],
                                  {"inner.0": layer}, progress=False)["inner.0"]
    kept = x[mask.bool()].double()
    assert stats.count == 3
    torch.testing.assert_close(stats.gram, kept.T @ kept)
    torch.testing.assert_close(stats.mean_abs, kept.abs().mean(0))


@pytest.mark.parametrize("dtype, atol, rtol", [
    (torch.float32, 1e-5, 1e-5),
    (torch.float16, 1e-3, 1e-2),
    (torch.bfloat16, 1e-2, 2e-2),  # two thin products round differently from one dense one
])
def test_converted_layers_keep_dtype_and_match_reference(dtype, atol, rtol):
    model = Net(dtype)
    reparam.convert(model, {"Linear": {"method": "low_rank", "rank": 4}}, progress=False)
    layer = model.head
    assert layer.u.dtype == dtype and layer.bias.dtype == dtype
    x = torch.randn(5, 16, dtype=dtype)
    assert model(x).dtype == dtype
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.materialize(), layer.bias),
                               atol=atol, rtol=rtol)


def test_deepcopy_and_to_linear():
    model = Net()
    reparam.convert(model, {"Linear": LR}, progress=False)
    twin = copy.deepcopy(model)
    x = torch.randn(3, 16)
    assert torch.equal(twin(x), model(x))
    linear = model.head.to_linear()
    assert type(linear) is nn.Linear
    torch.testing.assert_close(linear(x), model.head(x))


def test_torch_compile_gives_same_outputs():
    model = Net()
    reparam.convert(model, {"Linear": LR}, progress=False)
    x = torch.randn(6, 16)
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_dense_weights_are_released_after_convert():
    model = Net()
    weight = model.encoder[0].weight
    ref = torch.utils.weak.WeakTensorKeyDictionary()
    ref[weight] = True
    del weight
    reparam.convert(model, {"Linear": LR}, progress=False)
    assert len(ref) == 0


class _Opaque(torch.Tensor):
    """A weight reparam cannot read, like torchao's quantized tensors (only detach and alias dispatch)."""

    @staticmethod
    def __new__(cls, data):
        return torch.Tensor._make_wrapper_subclass(cls, data.shape, dtype=data.dtype)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.detach.default, torch.ops.aten.alias.default):
            return args[0]
        raise NotImplementedError(f"_Opaque dispatch: {func}")


def test_tensor_subclass_weights_are_refused_by_name():
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2))
    model[0].weight = nn.Parameter(_Opaque(torch.randn(4, 8)), requires_grad=False)
    with pytest.raises(ConfigError, match=r"layer '0' holds its weight as _Opaque, a tensor subclass \(e.g. "
                                          r"quantized by torchao's quantize_\); reparam fits plain floating-point"):
        reparam.convert(model, {"Linear": "w4-rtn"}, progress=False)
    assert type(model[1]) is nn.Linear
