import torch
import torch.nn.functional as F
from torch import nn

import reparam
from reparam import LayerStats
from reparam.core.budget import weight_nbytes
from reparam.methods.quantized_low_rank import QuantizedLowRankLinear


def low_rank_weight(out_features, in_features, rank):
    spectrum = torch.logspace(0, -1.5, rank)
    return (torch.randn(out_features, rank) * spectrum) @ torch.randn(rank, in_features) / 8


def test_quantized_factors_keep_a_larger_rank_and_beat_fp32_factors_at_fewer_bytes():
    linear = nn.Linear(256, 192)
    with torch.no_grad():
        linear.weight.copy_(low_rank_weight(192, 256, 128))
    x = torch.randn(2000, 256) * torch.linspace(0.2, 2, 256)
    stats = LayerStats.from_inputs(x)
    fp32 = reparam.apply(linear, {"method": "low_rank", "rank": 32}, stats)
    quantized = reparam.apply(linear, {"method": "quantized_low_rank", "base": {"method": "affine", "bits": 8},
                                       "rank": 96}, stats)
    assert weight_nbytes(quantized) < weight_nbytes(fp32)
    assert stats.output_error(linear.weight, quantized.weight) < 0.5 * stats.output_error(linear.weight, fp32.weight)


def test_refitting_u_to_the_quantized_v_lowers_the_output_error():
    linear = nn.Linear(128, 96)
    with torch.no_grad():
        linear.weight.copy_(low_rank_weight(96, 128, 64))
    stats = LayerStats.from_inputs(torch.randn(1000, 128) * torch.linspace(0.2, 2, 128))
    layer = reparam.apply(linear, {"method": "quantized_low_rank", "base": {"method": "affine", "bits": 3},
                                   "rank": 64}, stats)
    v_hat = layer.v.materialize().double()
    gram = stats.gram
    best_u = torch.linalg.solve(v_hat @ gram @ v_hat.T, v_hat @ gram @ linear.weight.double().T).T
    # The quantized U stays close to the refitted optimum: within the error 3 bits cost.
    optimum = stats.output_error(linear.weight, best_u @ v_hat)
    assert optimum < stats.output_error(linear.weight, layer.weight) < 1.5 * optimum + 0.05


def test_forward_matches_the_materialized_weight_and_round_trips_exactly(tmp_path):
    model = nn.Sequential(nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 80, bias=False))
    config = {"method": "quantized_low_rank", "base": {"method": "shift_add", "bits": 3}, "rank_ratio": 0.5}
    reparam.convert(model, {"Linear": config}, calib=[torch.randn(16, 96) for _ in range(3)], progress=False)
    layer = model[0]
    assert isinstance(layer, QuantizedLowRankLinear) and layer.rank == 32
    x = torch.randn(4, 96)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    path = tmp_path / "model.safetensors"
    reparam.save(model, path)
    fresh = nn.Sequential(nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 80, bias=False))
    reparam.load(fresh, path)
    assert torch.equal(fresh(x), model(x))
