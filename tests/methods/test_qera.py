import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reparam
from reparam import LayerStats
from reparam.core.config import ConfigError
from reparam.methods.qera import QeraConfig, QeraLinear


def correlated_inputs(tokens, features):
    mix = torch.randn(features, features) * torch.logspace(0, -2, features)
    return torch.randn(tokens, features) @ mix


def test_the_repair_lowers_the_output_error_on_calibration_data():
    # A weight with a few strong directions: 2 bits lose them, the rank-8 repair gives them back.
    linear = nn.Linear(128, 96)
    with torch.no_grad():
        linear.weight.add_(torch.randn(96, 8) @ torch.randn(8, 128) / 4)
    stats = LayerStats.from_inputs(correlated_inputs(1000, 128))
    base = {"method": "affine", "bits": 2}
    plain = reparam.apply(linear, base, stats)
    repaired = reparam.apply(linear, {"method": "qera", "base": base, "rank": 8}, stats)
    errors = [stats.output_error(linear.weight, m.weight) for m in (plain, repaired)]
    assert errors[1] < 0.8 * errors[0]
    # The same quantized part: the repair only adds to it.
    assert torch.equal(repaired.quantized.planes, plain.planes)


def test_the_repair_is_the_optimal_rank_k_correction_of_the_residual():
    linear = nn.Linear(48, 40).double()
    x = correlated_inputs(400, 48).double()
    stats = LayerStats.from_inputs(x)
    layer = QeraLinear.from_linear(linear, QeraConfig(base={"method": "affine", "bits": 3}, rank=5), stats)
    residual = (linear.weight.detach() - layer.quantized.materialize()) @ x.T
    sigma = torch.linalg.svdvals(residual)
    optimum = sigma[5:].square().sum().sqrt() / (linear.weight.detach() @ x.T).norm()
    # fp16 factors cost a little over the float64 optimum.
    assert stats.output_error(linear.weight, layer.weight) == pytest.approx(float(optimum), rel=1e-3)


def test_forward_matches_the_materialized_weight_and_to_linear():
    linear = nn.Linear(100, 24)
    layer = reparam.apply(linear, {"method": "qera", "base": {"method": "affine", "bits": 2}, "rank_bits": 1.0})
    assert layer.rank == int(100 * 24 // (16 * 124)) and layer.l.dtype == torch.float16
    x = torch.randn(3, 100)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    torch.testing.assert_close(layer.to_linear()(x), layer(x))


def test_save_load_round_trip_is_exact(tmp_path):
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    calib = [torch.randn(8, 64) for _ in range(4)]
    reparam.convert(model, {"Linear": {"method": "qera", "base": {"method": "affine", "bits": 3}, "rank": 4}},
                    calib=calib, progress=False)
    path = tmp_path / "model.safetensors"
    reparam.save(model, path)
    fresh = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    reparam.load(fresh, path)
    assert isinstance(fresh[0], QeraLinear)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    x = torch.randn(5, 64)
    assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("values, message", [
    ({"base": {"method": "affine", "bits": 3}}, "qera: set exactly one of rank or rank_bits"),
    ({"base": {"method": "affine", "bits": 3}, "rank": 2, "rank_bits": 0.5}, "qera: set exactly one of rank or rank_bits"),
    ({"base": {"method": "affine", "bits": 3}, "rank": 0}, "qera: rank=0 must be a positive integer"),
    ({"base": {"method": "low_rank", "rank": 2}, "rank": 2},
     "qera: base={'method': 'low_rank', 'rank': 2} must be a quantization method with integer bits, "
     "e.g. {'method': 'affine', 'bits': 4}"),
])
def test_config_errors(values, message):
    with pytest.raises(ConfigError) as err:
        reparam.apply(nn.Linear(8, 8), {"method": "qera", **values})
    assert str(err.value) == message
