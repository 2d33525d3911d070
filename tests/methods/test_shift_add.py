import pytest
import torch
from torch import nn

import reparam
from reparam import LayerStats, ShiftAddConfig, ShiftAddLinear
from reparam.core import state_nbytes
from reparam.core.budget import weight_nbytes
from reparam.core.quantizer import Quantizer
from reparam.methods.shift_add import CHEAP_ALS_ROUNDS, BinaryCoding, pow2_round


def relative_error(approx, weight):
    approx, weight = approx.detach().double(), weight.detach().double()
    return float((approx - weight).norm() / weight.norm())


def correlated_inputs(tokens, features):
    mix = torch.randn(features, features) * torch.logspace(0, -2, features)
    return torch.randn(tokens, features) @ mix


@pytest.mark.parametrize("pow2_terms", [None, 3])
def test_binary_coding_is_exact_when_bits_suffice(pow2_terms):
    # Each row of each group is Σ α_i·B_i with α = (0.75, 0.25, 0.0625)·2^k: sums of
    # powers of two, so exactly representable with either kind of scale.
    rows, columns = 6, 64
    alpha = torch.tensor([0.75, 0.25, 0.0625], dtype=torch.float64) * 2.0 ** torch.arange(rows)[:, None, None]
    signs = torch.randint(0, 2, (rows, 2, 32, 3)).double() * 2 - 1  # (rows, groups, columns, q)
    weight = (signs * alpha[:, :, None, :].expand(rows, 2, 1, 3)).sum(-1).reshape(rows, columns)
    quantizer = BinaryCoding(3, 32, pow2_terms)
    codes, params = quantizer.quantize(weight)
    torch.testing.assert_close(quantizer.dequantize(codes, params), weight, rtol=0, atol=1e-12)


def test_pow2_rounding():
    values = torch.randn(1000, dtype=torch.float64) * 10.0 ** torch.randint(-3, 2, (1000,))
    for terms in (1, 2, 3):
        rounded = pow2_round(values, terms)
        # The greedy step leaves at most a third of the residual, so |v − r| ≤ |v|/3^terms.
        assert ((values - rounded).abs() <= values.abs() / 3 ** terms + 1e-15).all()
        assert torch.equal(rounded.half().double(), rounded)  # exact in fp16, as stored
    exact = torch.tensor([0.75, -0.3125, 2.0 ** -9 + 2.0 ** -12, 6.0], dtype=torch.float64)
    assert torch.equal(pow2_round(exact, 3), exact)
    assert pow2_round(torch.tensor([0.7], dtype=torch.float64), 1).item() == 0.5


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_compensated_fit_lowers_the_output_error(bits, act_order):
    linear = nn.Linear(256, 64)
    stats = LayerStats.from_inputs(correlated_inputs(2000, 256))
    errors = {fit: stats.output_error(linear.weight, reparam.apply(
        linear, ShiftAddConfig(bits=bits, fit=fit, act_order=act_order), stats).weight) for fit in ("rtn", "gptq")}
    assert errors["gptq"] < 0.8 * errors["rtn"]


def test_three_bits_take_at_most_3_4_bits_per_weight():
    layer = ShiftAddLinear.empty_like(nn.Linear(384, 384, bias=False), ShiftAddConfig(bits=3))
    assert state_nbytes(layer) * 8 / (384 * 384) == 3.375  # 3 planes + three fp16 α per 128 weights


def test_columns_not_divisible_by_the_group_are_padded():
    linear = nn.Linear(100, 24)
    layer = reparam.apply(linear, ShiftAddConfig(bits=4, group_size=64, fit="rtn"))
    assert layer.planes.shape == (4, 16, 24) and layer.params.shape == (24, 2, 4)
    x = torch.randn(3, 100)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    assert relative_error(layer.weight, linear.weight) < 0.1


@pytest.mark.parametrize("values, message", [
    ({"bits": 5}, "shift_add: bits=5 is not one of [2, 3, 4, 'auto']"),
    ({"bits": "auto"}, "shift_add: bits='auto' needs target_bits, the average bits per weight, e.g. target_bits=2.5"),
    ({"bits": 3, "target_bits": 2.5}, "shift_add: target_bits is only used with bits='auto'; drop it or set bits='auto'"),
    ({"group_size": 100}, "shift_add: group_size=100 must be a positive multiple of 32 (whole bytes per group, "
                          "and the kernel's tile) or 'row'; 128 is the usual choice"),
    ({"group_size": "rows"}, "shift_add: group_size='rows' must be a positive multiple of 32 (whole bytes per "
                             "group, and the kernel's tile) or 'row'; 128 is the usual choice"),
    ({"scale": "int"}, "shift_add: scale='int' is not one of ['pow2', 'float']"),
    ({"act_order": "yes"}, "shift_add: act_order='yes' must be true or false"),
])
def test_config_errors(values, message):
    with pytest.raises(reparam.ConfigError) as err:
        ShiftAddConfig(**values)
    assert str(err.value) == message


def test_gptq_without_calibration_is_refused():
    model = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(reparam.ConfigError, match="need calibration data; pass calib="):
        reparam.convert(model, {"0": {"method": "shift_add", "fit": "gptq"}}, progress=False)


def test_save_load_round_trip(tmp_path):
    model = nn.Sequential(nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 32))
    calib = [torch.randn(16, 96) for _ in range(4)]
    recipe = {"0": {"method": "shift_add", "bits": 2}, "2": {"method": "affine", "bits": 4, "symmetric": True}}
    reparam.convert(model, recipe, calib=calib, progress=False)
    path = tmp_path / "model.safetensors"
    reparam.save(model, path)
    fresh = nn.Sequential(nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 32))
    reparam.load(fresh, path)
    x = torch.randn(5, 96)
    assert torch.equal(fresh(x), model(x))
    assert fresh[0].config == model[0].config and fresh[0].planes.dtype == torch.uint8


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_layers(dtype):
    linear = nn.Linear(128, 32).to(dtype)
    layer = reparam.apply(linear, ShiftAddConfig(bits=4, fit="rtn"))
    x = torch.randn(4, 128, dtype=dtype)
    assert layer(x).dtype == dtype and layer.weight.dtype == dtype
    assert relative_error(layer.weight, linear.weight) < 0.1


def test_on_minilm_shift_add_beats_affine_and_auto_bits_beat_two_bits(minilm):
    fidelity, average = {}, None
    for label, config in [("shift_add 3", {"method": "shift_add", "bits": 3}),
                          ("affine 3", {"method": "affine", "bits": 3})]:
        model = minilm.fresh_model()
        reparam.convert(model, {minilm.layers: config}, calib=minilm.calib, progress=False)
        fidelity[label] = minilm.fidelity(model)
    # Bit allocation on the first two blocks (12 layers) keeps the test short.
    layers = "re:encoder\\.layer\\.[01]\\..*"
    for label, config in [("2 bits", {"method": "shift_add", "bits": 2}),
                          ("auto 2.5", {"method": "shift_add", "bits": "auto", "target_bits": 2.5})]:
        model = minilm.fresh_model()
        reparam.convert(model, {layers: config}, calib=minilm.calib, progress=False)
        fidelity[label] = minilm.fidelity(model)
        converted = [m for m in model.modules() if isinstance(m, ShiftAddLinear)]
        # Stored bits per weight, scales included, as the allocator counts them (core.budget).
        stored = 8 * sum(weight_nbytes(m) for m in converted) / sum(m.in_features * m.out_features
                                                                    for m in converted)
    assert fidelity["shift_add 3"] >= 0.95
    assert fidelity["shift_add 3"] > fidelity["affine 3"]
    # Per block (sequential), 2 of the 4 small layers fit at 3 bits: 2.4375 of the 2.5 allowed.
    assert 2.4 <= stored <= 2.5
    assert fidelity["auto 2.5"] > fidelity["2 bits"]


def reference_fit_group(quantizer, weight, importance):
    """The straightforward ALS on one batch of groups: explicit sign planes, the
    nearest level by comparing every weight with every level."""
    bits = quantizer.bits
    code_signs = ((torch.arange(2 ** bits)[:, None] >> torch.arange(bits) & 1) * 2 - 1).double()  # (2^q, q)

    def least_squares(signs, scale):
        weighted = signs * scale[..., None]
        gram = weighted.transpose(1, 2) @ signs
        gram = gram + 1e-9 * gram.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] * torch.eye(signs.shape[-1])
        return torch.linalg.solve(gram, (weighted.transpose(1, 2) @ weight[..., None])[..., 0])

    def nearest(levels):
        return (weight[..., None] - levels[:, None, :]).abs().argmin(-1)

    scale = torch.ones_like(weight) if importance is None else importance
    greedy, residual = torch.empty(*weight.shape, bits, dtype=weight.dtype), weight
    for i in range(bits):
        greedy[..., i] = torch.where(residual >= 0, 1.0, -1.0)
        residual = weight - (greedy[..., :i + 1] * least_squares(greedy[..., :i + 1], torch.ones_like(weight))[:, None]).sum(-1)
    step = weight.abs().amax(1, keepdim=True) / (2 ** bits - 1)
    grid = code_signs[nearest((step * 2.0 ** torch.arange(bits)) @ code_signs.T)]
    best, best_error = None, None
    for signs in (greedy, grid):
        alpha = least_squares(signs, scale)
        for _ in range(15):
            alpha = least_squares(code_signs[nearest(alpha @ code_signs.T)], scale)
        levels = alpha @ code_signs.T
        error = ((weight - levels.gather(1, nearest(levels))).square() * scale).sum(1)
        best = alpha if best is None else torch.where((error < best_error)[:, None], alpha, best)
        best_error = error if best_error is None else torch.minimum(error, best_error)
    return best


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("weighted", [False, True])
def test_fit_on_sorted_weights_equals_the_straightforward_als(bits, weighted):
    torch.manual_seed(bits)
    weight = torch.randn(200, 64, dtype=torch.float64) * torch.rand(200, 1, dtype=torch.float64)
    importance = torch.rand(200, 64, dtype=torch.float64) + 0.1 if weighted else None
    quantizer = BinaryCoding(bits, 64, pow2_terms=None)
    # Levels, not α: both starts can reach the same levels with the planes in another order.
    levels = quantizer.levels(quantizer.fit_group(weight, importance)).sort(-1).values
    expected = quantizer.levels(reference_fit_group(quantizer, weight, importance)).sort(-1).values
    torch.testing.assert_close(levels, expected)


def test_all_groups_at_once_equal_group_by_group():
    # 100 columns in groups of 32: three whole groups and a narrower last one.
    torch.manual_seed(0)
    weight = torch.randn(20, 100, dtype=torch.float64)
    quantizer = BinaryCoding(3, 32, pow2_terms=3)
    codes, params = quantizer.quantize(weight)
    for g, start in enumerate(range(0, 100, 32)):
        group = weight[:, start:start + 32]
        expected = quantizer.levels(pow2_round(reference_fit_group(quantizer, group, None), 3).half().double())
        levels = quantizer.levels(params[:, g])
        torch.testing.assert_close(levels.sort(-1).values, expected.sort(-1).values)
        nearest = (group[..., None] - levels[:, None, :]).abs().argmin(-1)
        torch.testing.assert_close(levels.gather(1, codes[:, start:start + 32]), levels.gather(1, nearest))


def output_errors(quantizer, weight, gram, codes, params):
    """(rows,) ‖(W − Ŵ)_r X‖² from the Gram matrix."""
    delta = weight - quantizer.dequantize(codes, params)
    return ((delta @ gram) * delta).sum(1)


@pytest.mark.parametrize("columns", [96, 100])  # whole groups, and a narrower last one
def test_scales_refitted_to_the_codes_are_the_least_squares_optimum(columns):
    torch.manual_seed(columns)
    weight = torch.randn(12, columns, dtype=torch.float64)
    x = correlated_inputs(400, columns).double()
    gram = x.T @ x
    quantizer = BinaryCoding(3, 32, pow2_terms=None)
    codes, params = quantizer.quantize(weight, gram)
    # Brute force: each row's Ŵ_r = B_r·α_r with B_r built column by column, solved by lstsq on X.
    groups = params.shape[1]
    signs = (codes[..., None] >> torch.arange(3) & 1) * 2.0 - 1  # (rows, columns, bits)
    group_of = torch.arange(columns) // 32
    for row in range(weight.shape[0]):
        basis = torch.zeros(columns, groups, 3, dtype=torch.float64)
        basis[torch.arange(columns), group_of] = signs[row].double()
        solution = torch.linalg.lstsq(x @ basis.view(columns, -1), x @ weight[row]).solution
        torch.testing.assert_close(params[row].reshape(-1), solution.half().double(), rtol=2e-3, atol=1e-4)


def test_refitted_pow2_scales_lower_the_output_error_and_never_raise_a_rows(monkeypatch):
    torch.manual_seed(1)
    weight = torch.randn(64, 128, dtype=torch.float64)
    x = correlated_inputs(600, 128).double()
    gram = x.T @ x
    quantizer = BinaryCoding(2, 32, pow2_terms=3)
    monkeypatch.setattr(BinaryCoding, "refit_to_codes", Quantizer.refit_to_codes)  # the scales as first fitted
    codes, params = quantizer.quantize(weight, gram)
    monkeypatch.undo()
    refitted = quantizer.refit_to_codes(weight, gram, codes, params)
    before = output_errors(quantizer, weight, gram, codes, params)
    after = output_errors(quantizer, weight, gram, codes, refitted)
    assert (after <= before).all()
    assert after.sum() < 0.95 * before.sum()  # 0.886 when written


def test_cheap_scores_fit_with_few_alternating_rounds():
    assert ShiftAddConfig(bits=3).cheap() == ShiftAddConfig(bits=3, fit="rtn", als_rounds=CHEAP_ALS_ROUNDS)
    torch.manual_seed(0)
    weight = torch.randn(300, 64, dtype=torch.float64)
    full, cheap = BinaryCoding(3, 64, None), BinaryCoding(3, 64, None, rounds=CHEAP_ALS_ROUNDS)
    errors = [relative_error(q.dequantize(*q.quantize(weight)), weight) for q in (full, cheap)]
    assert errors[0] <= errors[1] < 1.05 * errors[0]  # coarser, not much


def test_negative_als_rounds_are_refused():
    with pytest.raises(reparam.ConfigError, match=r"shift_add: als_rounds=-1 must be a non-negative integer"):
        ShiftAddConfig(bits=3, als_rounds=-1)
