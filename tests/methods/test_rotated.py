import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reparam
from reparam import LayerStats
from reparam.core.budget import weight_nbytes
from reparam.methods.rotated import RotatedConfig, RotatedLinear, hadamard

ROW_SHIFT_ADD = {"method": "shift_add", "bits": 3, "group_size": "row"}


def heavy_tailed_linear(in_features, out_features):
    linear = nn.Linear(in_features, out_features)
    with torch.no_grad():
        linear.weight.copy_(torch.distributions.StudentT(3.0).sample((out_features, in_features)) / 20)
    return linear


def correlated_inputs(tokens, features):
    return torch.randn(tokens, features) @ (torch.randn(features, features) * torch.logspace(0, -1.5, features))


def test_the_rotation_lowers_the_output_error_of_heavy_tailed_weights():
    torch.manual_seed(0)
    linear = heavy_tailed_linear(384, 96)
    stats = LayerStats.from_inputs(correlated_inputs(2000, 384))
    plain = reparam.apply(linear, ROW_SHIFT_ADD, stats)
    rotated = reparam.apply(linear, {"method": "rotated", "base": ROW_SHIFT_ADD}, stats)
    errors = [stats.output_error(linear.weight, m.weight) for m in (plain, rotated)]
    assert errors[1] < 0.75 * errors[0]  # measured 0.156 -> 0.100
    assert weight_nbytes(rotated) == weight_nbytes(plain)  # R is rebuilt from the seed, never stored


def test_the_rotation_is_orthogonal_and_quantizes_w_times_r():
    layer = RotatedLinear(96, 8, False, RotatedConfig(base={"method": "affine", "bits": 8, "fit": "rtn"}))
    assert layer.within.shape == (32, 32) and layer.across.shape == (3, 3)  # 3 blocks of 32: 96 = 3 · 2⁵
    rotation = layer.rotate(torch.eye(96, dtype=torch.float64))
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(96, dtype=torch.float64))
    torch.testing.assert_close(hadamard(4) * 2, torch.tensor([[1., 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1],
                                                               [1, -1, -1, 1]], dtype=torch.float64))
    weight = torch.randn(8, 96, dtype=torch.float64)
    layer.fit(weight, None)
    # the layer's weight is Q·Rᵀ, and at 8 bits Q ≈ W·R, so Q·Rᵀ ≈ W
    quantized = layer.quantized.materialize().double()
    torch.testing.assert_close(layer.materialize().double(), quantized @ rotation.T)
    assert (quantized - weight @ rotation).norm() < 0.01 * weight.norm()


def test_the_rotated_gram_is_that_of_the_rotated_inputs():
    x = correlated_inputs(300, 64).double()
    layer = RotatedLinear(64, 16, True, RotatedConfig(base={"method": "affine", "bits": 3}))
    stats = LayerStats.from_inputs(x)
    seen = {}
    layer.quantized.fit = lambda weight, rotated_stats: seen.update(stats=rotated_stats)
    layer.fit(torch.randn(16, 64, dtype=torch.float64), stats)
    expected = LayerStats.from_inputs(layer.rotate(x)).gram
    torch.testing.assert_close(seen["stats"].gram, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_matches_the_materialized_weight_and_to_linear(dtype):
    linear = nn.Linear(160, 24).to(dtype)
    layer = reparam.apply(linear, {"method": "rotated", "base": {"method": "affine", "bits": 4}})
    x = torch.randn(3, 160).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=tol, atol=tol)
    torch.testing.assert_close(layer.to_linear()(x), layer(x), rtol=tol, atol=tol)


def test_save_load_round_trip_is_exact(tmp_path):
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    calib = [torch.randn(8, 64) for _ in range(4)]
    recipe = {"Linear": {"method": "rotated", "base": ROW_SHIFT_ADD, "seed": 3}}
    reparam.convert(model, recipe, calib=calib, progress=False)
    path = tmp_path / "model.safetensors"
    reparam.save(model, path)
    loaded = reparam.load(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16)), path)
    x = torch.randn(5, 64)
    assert torch.equal(loaded(x), model(x))
    assert torch.equal(loaded[0].signs, model[0].signs)


@pytest.mark.parametrize("values, message", [
    ({"block": 96}, "rotated: block=96 must be a power of two ≥ 2, e.g. 128"),
    ({"seed": -1}, "rotated: seed=-1 must be a non-negative integer"),
    ({"base": {"method": "low_rank", "rank": 4}},
     "rotated: base={'method': 'low_rank', 'rank': 4} must be a quantization method with integer bits, "
     "e.g. {'method': 'affine', 'bits': 4}"),
])
def test_config_errors(values, message):
    with pytest.raises(reparam.ConfigError) as err:
        RotatedConfig(**values)
    assert str(err.value) == message


def test_an_odd_width_is_refused_naming_the_layer():
    model = nn.Sequential(nn.Linear(33, 8))
    with pytest.raises(reparam.ConfigError, match="rotated: layer '0' has an odd number of inputs \\(33\\)"):
        reparam.convert(model, {"0": {"method": "rotated"}}, progress=False)
