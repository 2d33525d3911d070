import pytest
import torch
from torch import nn

import reparam
from reparam import AffineConfig, LayerStats


@pytest.mark.parametrize("symmetric", [False, True])
def test_round_to_nearest_matches_the_textbook_formula(symmetric):
    weight = torch.randn(8, 64, dtype=torch.float64)
    quantizer = AffineConfig(bits=4, group_size=32, symmetric=symmetric).quantizer()
    codes, params = quantizer.quantize(weight)
    for g in range(2):
        group = weight[:, 32 * g:32 * (g + 1)]
        low, high = group.min(1).values.clamp_max(0), group.max(1).values.clamp_min(0)
        if symmetric:
            high = torch.maximum(high, -low)
            scale, zero = 2 * high / 15, torch.full_like(high, 8.0)
        else:
            scale = (high - low) / 15
            zero = torch.round(-low / scale)
        scale = scale.half().double()  # stored in fp16
        expected = (torch.round(group / scale[:, None] + zero[:, None]).clamp(0, 15) - zero[:, None]) * scale[:, None]
        torch.testing.assert_close(quantizer.dequantize(codes, params)[:, 32 * g:32 * (g + 1)], expected)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lowers_the_output_error(act_order):
    mix = torch.randn(128, 128) * torch.logspace(0, -2, 128)
    stats = LayerStats.from_inputs(torch.randn(1000, 128) @ mix)
    linear = nn.Linear(128, 48)
    errors = {fit: stats.output_error(linear.weight, reparam.apply(
        linear, AffineConfig(bits=3, fit=fit, act_order=act_order), stats).weight) for fit in ("rtn", "gptq")}
    assert errors["gptq"] < 0.8 * errors["rtn"]


def test_round_to_nearest_errs_by_about_half_a_step():
    linear = nn.Linear(256, 64)
    layer = reparam.apply(linear, AffineConfig(bits=8, fit="rtn"))
    assert layer.planes.shape == (8, 32, 64)
    step = layer.params[..., 0].float().repeat_interleave(128, dim=1)  # (out, in) scale of each weight
    # Half a step, plus what rounding the scale to fp16 (2^-11 relative) moves the outermost of 255 levels.
    assert ((layer.weight - linear.weight).abs() <= (0.5 + 255 * 2 ** -11) * step).all()
