import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reparam import LayerStats, LowRankConfig, LowRankLinear
from reparam.core import state_nbytes


def correlated_inputs(tokens, features, dead=0):
    """Inputs with a decaying spectrum, like real activations; ``dead`` channels are zero."""
    mix = torch.randn(features, features) * torch.logspace(0, -2, features)
    x = torch.randn(tokens, features) @ mix
    x[:, :dead] = 0
    return x


@pytest.mark.parametrize("factorizer", ["svd", "asvd", "whitened"])
@pytest.mark.parametrize("out_features, in_features", [(24, 40), (40, 24), (7, 13)])
def test_full_rank_is_exact(factorizer, out_features, in_features):
    linear = nn.Linear(in_features, out_features).double()
    stats = LayerStats.from_inputs(correlated_inputs(200, in_features))
    config = LowRankConfig(rank=min(in_features, out_features), factorizer=factorizer)
    layer = LowRankLinear.from_linear(linear, config, stats)
    torch.testing.assert_close(layer.materialize(), linear.weight, rtol=1e-9, atol=1e-9)


def test_whitened_reaches_the_optimal_output_error():
    # min over rank-r Ŵ of ‖(W − Ŵ)X‖ is the tail of WX's spectrum (Eckart–Young),
    # reachable when X has full row rank; plain SVD and ASVD do worse.
    linear = nn.Linear(32, 48).double()
    x = correlated_inputs(500, 32)
    stats = LayerStats.from_inputs(x)
    rank = 6
    wx = linear.weight.detach() @ x.double().T
    sigma = torch.linalg.svdvals(wx)
    optimum = float(sigma[rank:].square().sum().sqrt() / sigma.square().sum().sqrt())
    errors = {f: stats.output_error(linear.weight, LowRankLinear.from_linear(
        linear, LowRankConfig(rank=rank, factorizer=f), stats).materialize()) for f in ("svd", "asvd", "whitened")}
    assert errors["whitened"] == pytest.approx(optimum, rel=1e-6)
    assert errors["whitened"] < errors["asvd"] < errors["svd"]


def test_singular_gram_and_dead_channels_stay_finite():
    linear = nn.Linear(64, 16)
    stats = LayerStats.from_inputs(correlated_inputs(20, 64, dead=5))  # 20 tokens < 64 channels
    for factorizer in ("asvd", "whitened"):
        layer = LowRankLinear.from_linear(linear, LowRankConfig(rank=8, factorizer=factorizer), stats)
        assert torch.isfinite(layer.materialize()).all()
        assert stats.output_error(linear.weight, layer.materialize()) < 0.5


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.75])
@pytest.mark.parametrize("out_features, in_features, bias", [(384, 384, True), (1536, 384, True), (100, 37, False)])
def test_size_ratio_bounds_the_stored_bytes(ratio, out_features, in_features, bias):
    linear = nn.Linear(in_features, out_features, bias=bias)
    layer = LowRankLinear.empty_like(linear, LowRankConfig(size_ratio=ratio))
    assert state_nbytes(layer) <= ratio * state_nbytes(linear)
    if layer.rank < min(in_features, out_features):  # the rank is the largest that fits
        bigger = LowRankLinear.empty_like(linear, LowRankConfig(rank=layer.rank + 1))
        assert state_nbytes(bigger) > ratio * state_nbytes(linear)


@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 1e-2),
                                               (torch.bfloat16, 2e-2, 2e-2)])
def test_forward_matches_materialized_weight(dtype, atol, rtol):
    linear = nn.Linear(40, 24, dtype=dtype)
    layer = LowRankLinear.from_linear(linear, LowRankConfig(rank=5))
    assert layer.u.dtype == layer.v.dtype == layer.bias.dtype == dtype
    x = torch.randn(3, 7, 40, dtype=dtype)
    torch.testing.assert_close(layer(x), F.linear(x, layer.materialize(), layer.bias), atol=atol, rtol=rtol)


def test_factorizer_needing_stats_says_so():
    with pytest.raises(ValueError, match="factorizer 'whitened' needs calibration statistics; pass calib"):
        LowRankLinear.from_linear(nn.Linear(8, 8), LowRankConfig(rank=2, factorizer="whitened"))


def test_auto_picks_whitened_with_stats_and_svd_without():
    linear = nn.Linear(32, 32).double()
    stats = LayerStats.from_inputs(correlated_inputs(300, 32))
    auto = LowRankLinear.from_linear(linear, LowRankConfig(rank=4), stats).materialize()
    whitened = LowRankLinear.from_linear(linear, LowRankConfig(rank=4, factorizer="whitened"), stats).materialize()
    svd = LowRankLinear.from_linear(linear, LowRankConfig(rank=4, factorizer="svd")).materialize()
    assert torch.equal(auto, whitened)
    assert torch.equal(LowRankLinear.from_linear(linear, LowRankConfig(rank=4)).materialize(), svd)
