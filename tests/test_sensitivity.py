import types

import pytest
import torch
from torch import nn

import reparam
from reparam.sensitivity import collect_sensitivity


class Chain(nn.Module):
    """y = C·B·x: the sensitivity of b's output is diag(CᵀC) per token, of c's output 1."""

    def __init__(self, logits: bool = False):
        super().__init__()
        self.b, self.c = nn.Linear(8, 6, bias=False), nn.Linear(6, 5, bias=False)
        self.logits = logits

    def forward(self, x):
        y = self.c(self.b(x))
        return types.SimpleNamespace(logits=y) if self.logits else y


def test_hidden_state_probes_estimate_the_gauss_newton_diagonal():
    torch.manual_seed(0)
    model = Chain()
    calib = [torch.randn(4000, 8) for _ in range(2)]
    sens = collect_sensitivity(model, calib, {"b": model.b, "c": model.c}, probes=4, progress=False)
    c = model.c.weight.double()
    torch.testing.assert_close(sens["c"], torch.ones(5, dtype=torch.float64), atol=0.03, rtol=0)
    torch.testing.assert_close(sens["b"], (c.T @ c).diagonal(), rtol=0.03, atol=0)


def test_logit_probes_estimate_the_fisher_of_the_softmax():
    torch.manual_seed(0)
    model = Chain(logits=True)
    x = torch.randn(20000, 8)
    sens = collect_sensitivity(model, [x], {"c": model.c}, probes=2, progress=False)
    with torch.no_grad():
        p = model(x).logits.double().softmax(-1)
    expected = (p * (1 - p)).mean(0)  # E[(p_o − 1[ŷ = o])²] over ŷ ~ p
    torch.testing.assert_close(sens["c"], expected, rtol=0.05, atol=0)


def test_padding_and_frozen_parameters():
    torch.manual_seed(0)
    model = Chain()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, inputs, attention_mask):
            return self.inner(inputs)

    wrapped = Masked()
    padded = collect_sensitivity(wrapped, [{"inputs": x, "attention_mask": mask}], {"c": model.c}, progress=False)
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    # c's sensitivity is r² averaged over the 8 real tokens: never NaN, and finite despite the frozen weights
    assert torch.isfinite(padded["c"]).all() and padded["c"].gt(0).all()


def test_weighted_error_is_the_sensitivity_weighted_output_error():
    torch.manual_seed(0)
    x, weight, approx = torch.randn(50, 8), torch.randn(4, 8), torch.randn(4, 8)
    stats = reparam.LayerStats.from_inputs(x)
    stats.sensitivity = torch.rand(4, dtype=torch.float64)
    per_row = ((x.double() @ (weight.double() - approx.double()).T) ** 2).sum(0)
    assert stats.weighted_error(weight, approx) == pytest.approx(float(per_row @ stats.sensitivity), rel=1e-10)


def test_a_layer_off_the_output_path_is_named():
    model = nn.ModuleDict({"used": nn.Linear(4, 4), "unused": nn.Linear(4, 4)})
    model.forward = lambda x: model["used"](x)
    with pytest.warns(UserWarning, match=r"1 layer\(s\), e.g. 'unused', do not reach the model's output"):
        sens = collect_sensitivity(model, [torch.randn(3, 4)], dict(model.items()), progress=False)
    assert torch.equal(sens["unused"], torch.zeros(4, dtype=torch.float64))
