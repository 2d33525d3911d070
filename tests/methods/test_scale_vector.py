import pytest
import torch
from torch import nn

import reparam
from reparam import ConfigError
from reparam.methods.scale_vector import MagnitudeDirection, RowColumnScales

RECIPE = {"LayerNorm": {"method": "scale_vector"}, "re:encoder\\..*": {"method": "scale_vector"}}


def perturb(model):
    """Move every scale vector away from identity, so folding has work to do."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (MagnitudeDirection, RowColumnScales)):
                for p in module.parameters():
                    p.mul_(1 + 0.2 * torch.randn(p.shape, generator=generator))


def test_minilm_identity_at_wrapping_then_fold_exact(minilm):
    model = minilm.fresh_model()
    batch = minilm.heldout[0]
    original = model(**batch).last_hidden_state
    report = reparam.convert(model, RECIPE, progress=False)
    assert len(report.layers) == 13 + 36  # every LayerNorm and every encoder Linear
    torch.testing.assert_close(model(**batch).last_hidden_state, original, rtol=1e-4, atol=1e-4)

    perturb(model)
    scaled = model(**batch).last_hidden_state
    assert (scaled - original).abs().max() > 0.1  # the perturbation changed the model
    folded = reparam.fold(model)
    assert len(folded) == 49
    assert all(type(m.weight) is nn.Parameter for m in model.modules() if isinstance(m, (nn.Linear, nn.LayerNorm)))
    assert not any("parametrizations" in name for name, _ in model.named_modules())
    torch.testing.assert_close(model(**batch).last_hidden_state, scaled, rtol=1e-4, atol=1e-4)


def test_linear_scales_are_row_and_column_scalings():
    layer = nn.Linear(5, 3)
    weight = layer.weight.detach().clone()
    reparam.convert(nn.Sequential(layer), {"0": {"method": "scale_vector"}}, progress=False)
    scales = layer.parametrizations.weight[0]
    torch.testing.assert_close(scales.row_scale(), torch.ones(3))
    torch.testing.assert_close(scales.column_scale(), torch.ones(5))
    perturb(layer)
    u, v = scales.row_scale(), scales.column_scale()
    torch.testing.assert_close(layer.weight, torch.diag(u) @ weight @ torch.diag(v))
    # u = m·d/‖d‖: scaling the direction changes nothing, the magnitude scales u.
    with torch.no_grad():
        scales.row_direction.mul_(3.0)
    torch.testing.assert_close(scales.row_scale(), u)
    assert float(scales.row_scale().detach().norm()) == pytest.approx(float(scales.row_magnitude.detach()), rel=1e-6)


@pytest.mark.parametrize("sides, parameters", [("rows", {"row_magnitude", "row_direction"}),
                                               ("columns", {"column_magnitude", "column_direction"})])
def test_one_sided_scales(sides, parameters):
    layer = nn.Linear(4, 6)
    reparam.convert(nn.Sequential(layer), {"0": {"method": "scale_vector", "sides": sides}}, progress=False)
    assert {n for n, _ in layer.parametrizations.weight[0].named_parameters()} == parameters


def test_rms_norm_and_save_load(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8), nn.RMSNorm(8), nn.Linear(8, 2))
    reparam.convert(model, {"Linear": {"method": "scale_vector"}, "RMSNorm": {"method": "scale_vector"}},
                    progress=False)
    perturb(model)
    reparam.save(model, tmp_path / "m.safetensors")
    fresh = nn.Sequential(nn.Linear(8, 8), nn.RMSNorm(8), nn.Linear(8, 2))
    reparam.load(fresh, tmp_path / "m.safetensors")
    x = torch.randn(3, 8)
    assert torch.equal(fresh(x), model(x))


def test_invalid_sides_and_norm_without_weight():
    with pytest.raises(ConfigError, match=r"sides='top' is not one of \['both', 'rows', 'columns'\]"):
        reparam.convert(nn.Sequential(nn.Linear(2, 2)), {"0": {"method": "scale_vector", "sides": "top"}})
    model = nn.Sequential(nn.LayerNorm(4, elementwise_affine=False))
    with pytest.raises(ConfigError, match="layer '0' has no weight for 'scale_vector' to reparameterize"):
        reparam.convert(model, {"0": {"method": "scale_vector"}}, progress=False)


def test_failed_convert_restores_parametrized_layers_exactly(monkeypatch):
    import reparam.methods.scale_vector as sv

    model = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4), nn.Linear(4, 4))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    real = sv.RowColumnScales.__init__
    calls = []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        real(self, *args, **kwargs)

    monkeypatch.setattr(sv.RowColumnScales, "__init__", failing)
    with pytest.raises(RuntimeError, match="boom"):
        reparam.convert(model, {"LayerNorm": {"method": "scale_vector"}, "Linear": {"method": "scale_vector"}},
                        progress=False)
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert not any(hasattr(m, "parametrizations") or hasattr(m, "reparam_config") for m in model)


def test_norm_with_all_zero_scale_is_refused():
    # Issue 12, item 4: γ = 0 has no direction; m·d/‖d‖ was NaN for the whole layer.
    norm = nn.LayerNorm(8)
    with torch.no_grad():
        norm.weight.zero_()
    model = nn.Sequential(norm)
    with pytest.raises(ConfigError, match=r"scale_vector: the scale γ of layer '0' is all zero, which has no "
                                          r"direction \(m·d/‖d‖ would be NaN\); exclude the layer"):
        reparam.convert(model, {"0": {"method": "scale_vector"}}, progress=False)
    assert type(norm) is nn.LayerNorm and not norm.weight.any()


def test_load_refuses_a_zero_direction(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 4))
    reparam.convert(model, {"LayerNorm": {"method": "scale_vector"}, "1": {"method": "scale_vector"}},
                    progress=False)
    reparam.save(model, tmp_path / "m.safetensors")
    with safe_open(tmp_path / "m.safetensors", framework="pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if k != "reparam.sha256"}  # as a hand edit would
    for key in ("0.parametrizations.weight.original", "1.parametrizations.weight.0.row_direction"):
        tensors = load_file(tmp_path / "m.safetensors")
        tensors[key].zero_()
        save_file(tensors, tmp_path / "bad.safetensors", metadata=metadata)
        fresh = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 4))
        with pytest.raises(reparam.FileFormatError, match=f"'{key[2:]}' is all zero: a direction needs a nonzero"):
            reparam.load(fresh, tmp_path / "bad.safetensors")
        assert not any(hasattr(m, "parametrizations") for m in fresh.modules())
