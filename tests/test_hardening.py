"""Issue 12: silent no-ops and unclear errors outside save/load (those are in test_io.py)."""
import pytest
import torch
from torch import nn

import reparam
from reparam import ConfigError, DenseSparseConfig, LayerStats


def stf_model():
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8))
    reparam.convert(model, {"0": {"method": "dense_sparse", "atoms": 8, "nnz": 3, "factorizer": "plain"}},
                    progress=False)
    return model


@pytest.mark.parametrize("built", ["before first train()", "in train mode"])
def test_stf_optimizer_keeps_updating_what_the_forward_uses_across_eval_train(built):
    # Issue 12, item 7: each train() once made a new shadow the optimizer did not hold.
    model = stf_model()
    layer = model[0]
    x = torch.randn(6, 16)
    if built == "in train mode":
        model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(2):  # two full train -> eval -> train cycles
        model(x).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        model.eval()
        model.train()
    shadow = layer.shadow.detach().clone()
    d = layer.d.detach().clone()
    model(x).square().sum().backward()
    grad = layer.shadow.grad.clone()
    optimizer.step()
    # The step landed on the tensors the forward reads: the shadow moved by exactly -lr·grad.
    torch.testing.assert_close(layer.shadow.detach(), shadow - 0.05 * grad)
    assert not torch.equal(layer.d.detach(), d)
    assert any(p is layer.shadow for p in optimizer.param_groups[0]["params"])
    model.eval()
    packed = layer.values.detach().clone()
    assert torch.equal(packed, layer.shadow.detach().gather(0, layer.indices.long()))


def test_stf_shadow_keeps_its_small_entries_over_eval_and_follows_a_load():
    model = stf_model()
    layer = model[0]
    model.train()
    with torch.no_grad():
        layer.shadow.add_(0.001)  # entries below the top-s of each column
    trained = layer.shadow.detach().clone()
    model.eval()
    model.train()
    assert torch.equal(layer.shadow.detach(), trained)  # nothing lost to the eval/train cycle
    other = stf_model()
    layer.load_state_dict(other[0].state_dict())  # new packed codes: the shadow must follow them
    x = torch.randn(4, 16)
    torch.testing.assert_close(layer(x), other[0](x))


def test_stf_keeps_a_frozen_layer_frozen():
    model = stf_model()
    model.requires_grad_(False)
    model.train()
    model.eval()
    model.eval()
    assert not any(p.requires_grad for p in model.parameters())


def test_float_bits_name_the_integer_choices():
    # Issue 12, item 14: bits=3.0 once passed the check and failed with "bits='auto' is resolved per layer".
    with pytest.raises(ConfigError, match=r"shift_add: bits=3.0 must be an integer from \[2, 3, 4\], or 'auto' "
                                          "with target_bits"):
        reparam.convert(nn.Sequential(nn.Linear(64, 64)), {"0": {"method": "shift_add", "bits": 3.0}},
                        progress=False)


def test_affine_symmetric_must_be_a_flag():
    with pytest.raises(ConfigError, match="affine: symmetric='yes' must be true or false"):
        reparam.AffineConfig(symmetric="yes")


@pytest.mark.parametrize("calib, error, message", [
    ([torch.randn(3, 65)], ValueError, r"calibration gave layer '0' inputs of shape \(3, 65\): last dimension 65, "
                                       r"but the layer takes 64 features"),
    ([torch.ones(3, 64, dtype=torch.long)], TypeError, "calibration gave layer '0' torch.int64 inputs; its inputs "
                                                       "must be real floating point"),
    ([1, 2], TypeError, "calibration gave layer '0' a int, not a tensor; calib must hold model inputs"),
    ([torch.full((3, 64), float("nan"))], ValueError, "calibration inputs of layer '0' contain NaN or Inf; "
                                                      "check the calibration batches"),
])
def test_bad_calibration_inputs_name_the_layer_and_leave_the_model(calib, error, message):
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=message):
        reparam.convert(model, {"0": {"method": "low_rank", "rank": 4, "factorizer": "whitened"}}, calib=calib,
                        progress=False)
    assert type(model[0]) is nn.Linear and all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_layer_stats_without_a_name():
    with pytest.raises(ValueError, match=r"calibration gave the layer inputs of shape \(2, 3\)"):
        LayerStats.empty(4).add(torch.zeros(2, 3))
    with pytest.raises(TypeError, match="calibration gave the layer a int, not a tensor"):
        LayerStats.from_inputs(3)


def test_two_four_pattern_on_a_layer_narrower_than_four():
    # Issue 12, item 14: once a reshape error from deep inside the fit.
    model = nn.Sequential(nn.Linear(16, 3))
    with pytest.raises(ConfigError, match=r"dense_sparse: pattern '2:4' needs at least 4 atoms, but layer '0' is "
                                          r"3x16 \(atoms ≤ min\(in, out\) = 3\)"):
        reparam.convert(model, {"0": DenseSparseConfig(size_ratio=0.9, pattern="2:4")}, progress=False)
