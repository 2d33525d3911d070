import pytest
import torch
from torch import nn

import reparam
from reparam import DenseSparseConfig, DenseSparseLinear, LayerStats
from reparam.core import state_nbytes
from reparam.kernels.dense_sparse import sparse_to_dense


def correlated_inputs(tokens, features):
    mix = torch.randn(features, features) * torch.logspace(0, -2, features)
    return torch.randn(tokens, features) @ mix


def test_exact_when_every_column_uses_every_atom():
    # nnz = atoms = rank(W): D·S can be any rank-k factorization, so the fit is exact.
    weight = torch.randn(30, 6, dtype=torch.float64) @ torch.randn(6, 40, dtype=torch.float64)
    linear = nn.Linear(40, 30).double()
    with torch.no_grad():
        linear.weight.copy_(weight)
    layer = reparam.apply(linear, DenseSparseConfig(atoms=6, nnz=6, factorizer="plain"))
    torch.testing.assert_close(layer.weight, weight, rtol=1e-9, atol=1e-9)


def test_alternating_rounds_lower_the_error_from_the_svd_start(monkeypatch):
    # W = D0·S0 with 2 of 8 atoms per column: sparse codes of the SVD's
    # dictionary are poor; dictionary updates move it towards the planted one.
    import reparam.methods.dense_sparse as dense_sparse
    torch.manual_seed(1)
    d0 = torch.randn(40, 8, dtype=torch.float64)
    s0 = torch.zeros(8, 60, dtype=torch.float64)
    for j in range(60):
        s0[torch.randperm(8)[:2], j] = torch.randn(2, dtype=torch.float64)
    linear = nn.Linear(60, 40).double()
    with torch.no_grad():
        linear.weight.copy_(d0 @ s0)
    errors = {}
    for rounds in (0, 4):
        monkeypatch.setattr(dense_sparse, "ROUNDS", rounds)
        layer = reparam.apply(linear, DenseSparseConfig(atoms=8, nnz=2, factorizer="plain"))
        errors[rounds] = float((layer.weight.detach() - d0 @ s0).norm() / (d0 @ s0).norm())
    assert errors[4] < 0.8 * errors[0]


@pytest.mark.parametrize("act_order", [False, True])
def test_whitened_fit_lowers_the_output_error(act_order):
    linear = nn.Linear(96, 64)
    stats = LayerStats.from_inputs(correlated_inputs(2000, 96))
    errors = {kind: stats.output_error(linear.weight, reparam.apply(
        linear, DenseSparseConfig(atoms=32, nnz=8, factorizer=kind, act_order=act_order), stats).weight)
        for kind in ("plain", "whitened")}
    assert errors["whitened"] < 0.7 * errors["plain"]


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("out_features, in_features", [(384, 384), (1536, 384), (384, 1536), (50, 70)])
def test_size_ratio_bounds_the_stored_bytes(ratio, out_features, in_features):
    linear = nn.Linear(in_features, out_features)
    layer = DenseSparseLinear.empty_like(linear, DenseSparseConfig(size_ratio=ratio))
    assert state_nbytes(layer) <= ratio * state_nbytes(linear)
    assert state_nbytes(layer) > 0.9 * ratio * state_nbytes(linear)  # and uses most of it
    assert layer.indices.dtype == (torch.uint8 if layer.atoms <= 256 else torch.int16)


def test_two_four_pattern():
    linear = nn.Linear(64, 48)
    layer = reparam.apply(linear, DenseSparseConfig(size_ratio=0.5, pattern="2:4", factorizer="plain"))
    assert layer.nnz == layer.atoms // 2 and layer.atoms % 4 == 0
    runs = (sparse_to_dense(layer.values, layer.indices, layer.atoms) != 0).T.reshape(64, -1, 4)
    assert (runs.sum(-1) <= 2).all()
    assert state_nbytes(layer) <= 0.5 * state_nbytes(linear)


def test_stf_moves_the_pattern_and_packs_it_back():
    layer = reparam.apply(nn.Linear(32, 16), DenseSparseConfig(atoms=8, nnz=2, factorizer="plain"))
    before = sparse_to_dense(layer.values, layer.indices, 8).clone()
    layer.train()
    assert layer.shadow.shape == (8, 32) and not layer.values.requires_grad
    x = torch.randn(5, 32)
    layer(x).square().sum().backward()
    outside = before == 0
    assert layer.shadow.grad[outside].abs().sum() > 0  # straight-through: pruned entries learn too
    with torch.no_grad():  # promote one pruned entry above everything in its column
        layer.shadow[outside.nonzero()[0][0], outside.nonzero()[0][1]] = 100.0
    trained_output = layer(x)
    layer.eval()
    assert layer.values.requires_grad  # the packed codes are what trains in eval mode
    after = sparse_to_dense(layer.values, layer.indices, 8)
    atom, column = outside.nonzero()[0].tolist()
    assert after[atom, column] == 100.0 and (after != 0).sum(0).eq(2).all()
    torch.testing.assert_close(layer(x), trained_output.detach())


def test_state_dict_in_training_holds_the_packed_form():
    layer = reparam.apply(nn.Linear(32, 16), DenseSparseConfig(atoms=8, nnz=2, factorizer="plain"))
    layer.train()
    with torch.no_grad():
        layer.shadow.mul_(2)
    state = layer.state_dict()
    assert set(state) == {"d", "values", "indices", "bias"}
    fresh = DenseSparseLinear.empty_like(nn.Linear(32, 16), layer.config)
    fresh.load_state_dict(state)
    x = torch.randn(3, 32)
    torch.testing.assert_close(fresh(x), layer(x))


@pytest.mark.parametrize("values, message", [
    ({"atoms": 8}, "dense_sparse: set both atoms and nnz, or size_ratio"),
    ({"atoms": 8, "nnz": 9}, "dense_sparse: nnz=9 exceeds atoms=8; a column cannot use more atoms than the "
                             "dictionary has"),
    ({"atoms": 10, "nnz": 5, "pattern": "2:4"}, "dense_sparse: pattern '2:4' needs atoms divisible by 4 and "
                                               "nnz = atoms/2, got atoms=10, nnz=5"),
    ({"size_ratio": 0.5, "pattern": "1:4"}, "dense_sparse: pattern='1:4' is not one of [None, '2:4']"),
    ({"size_ratio": 0.5, "act_order": 1}, "dense_sparse: act_order=1 must be true or false"),
])
def test_config_errors(values, message):
    with pytest.raises(reparam.ConfigError) as err:
        DenseSparseConfig(**values)
    assert str(err.value) == message


def test_save_load_round_trip(tmp_path):
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16))
    calib = [torch.randn(32, 64) for _ in range(4)]
    reparam.convert(model, {"0": {"method": "dense_sparse", "size_ratio": 0.5},
                            "2": {"method": "dense_sparse", "atoms": 8, "nnz": 4}}, calib=calib, progress=False)
    path = tmp_path / "model.safetensors"
    reparam.save(model, path)
    fresh = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16))
    reparam.load(fresh, path)
    x = torch.randn(5, 64)
    assert torch.equal(fresh(x), model(x)) and fresh[0].indices.dtype == torch.uint8


def test_on_minilm_beats_low_rank_at_half_the_bytes(minilm):
    fidelity, ratios = {}, {}
    for method in ("dense_sparse", "low_rank"):
        model = minilm.fresh_model()
        report = reparam.convert(model, {minilm.layers: {"method": method, "size_ratio": 0.5}},
                                 calib=minilm.calib, progress=False)
        fidelity[method] = minilm.fidelity(model)
        ratios[method] = report.bytes_after / report.bytes_before
    assert ratios["dense_sparse"] <= 0.5
    assert fidelity["dense_sparse"] >= 0.85
    assert fidelity["dense_sparse"] > fidelity["low_rank"]


def reference_codes(weight, dictionary, nnz, compensation):
    """Column by column in the weight's own space: support by |D⁺w|·‖d‖, values by least squares on it."""
    pinv, norms = torch.linalg.pinv(dictionary), dictionary.norm(dim=0)
    values = torch.empty(nnz, weight.shape[1], dtype=weight.dtype)
    indices = torch.empty(nnz, weight.shape[1], dtype=torch.int64)

    def approximate(col, pending):
        column = pending[:, 0]
        support = ((pinv @ column).abs() * norms).topk(nnz).indices.sort().values
        atoms = dictionary[:, support]
        values[:, col], indices[:, col] = torch.linalg.solve(atoms.T @ atoms, atoms.T @ column), support
        return atoms @ values[:, col]

    compensation.run(weight, approximate)
    return values, indices


@pytest.mark.parametrize("act_order", [False, True])
def test_codes_from_projections_equal_column_by_column_codes(act_order):
    from reparam.core.compensation import Compensation
    from reparam.methods.dense_sparse import SparseDictionary
    torch.manual_seed(0)
    weight, dictionary = torch.randn(50, 70, dtype=torch.float64), torch.randn(50, 12, dtype=torch.float64)
    compensation = Compensation(LayerStats.from_inputs(correlated_inputs(500, 70)).gram, act_order=act_order)
    values, indices = SparseDictionary(12, 4, None, whitened=True).codes(weight, dictionary, compensation)
    expected_values, expected_indices = reference_codes(weight, dictionary, 4, compensation)
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(values, expected_values)
