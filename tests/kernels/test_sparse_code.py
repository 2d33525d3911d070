"""dense_sparse's compensated code step: the compiled op against its torch definition
(``Compensation.run`` calling the column code in Python)."""
from unittest import mock

import pytest
import torch

from reparam.core.compensation import BLOCK, STEP, Compensation
from reparam.kernels.extension import compiled_ops
from reparam.kernels.sparse_code import compensated_codes, sparse_code_column_reference
from reparam.methods.dense_sparse import _Coder

pytestmark = pytest.mark.skipif(compiled_ops() is None, reason="the compiled kernels could not be built")


def problem(out_features, atoms, nnz, columns, seed, dead=()):
    """(projected (k, in), compensation, coder) of a random layer."""
    torch.manual_seed(seed)
    dictionary = torch.randn(out_features, atoms, dtype=torch.float64)
    inputs = torch.randn(3 * columns, columns, dtype=torch.float64) * torch.rand(columns, dtype=torch.float64)
    inputs[:, list(dead)] = 0
    weight = torch.randn(out_features, columns, dtype=torch.float64)
    return dictionary.T @ weight, inputs.T @ inputs, _Coder(dictionary, nnz, None)


def python_codes(projected, compensation, coder):
    """The definition: ``Compensation.run`` with the column code in torch, whatever the extension."""
    with mock.patch("reparam.kernels.sparse_code.compiled_ops", lambda: None):
        return compensated_codes(projected, compensation, coder)


def compiled_codes(projected, compensation, coder, block=BLOCK, step=STEP):
    return compiled_ops().sparse_codes_compensated(projected, compensation.update.contiguous(), compensation.order,
                                                   compensation.dead, coder.contribution.T.contiguous(),
                                                   coder.system, coder.gram, coder.nnz, block, step)


def assert_same_codes(got, want, dead=()):
    live = [c for c in range(want[1].shape[1]) if c not in dead]
    assert torch.equal(got[1][:, live], want[1][:, live])  # the same supports, ascending
    # A dead column's y is 0: every support ties, and every one codes it as zeros.
    torch.testing.assert_close(got[0], want[0], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("out_features, atoms, nnz, columns", [(48, 24, 9, 40), (30, 12, 4, 150), (6, 3, 3, 5),
                                                               (9, 4, 1, 17)])
def test_matches_the_torch_loop(act_order, out_features, atoms, nnz, columns):
    projected, gram, coder = problem(out_features, atoms, nnz, columns, seed=columns, dead=[1])
    compensation = Compensation(gram, act_order=act_order)
    want = python_codes(projected, compensation, coder)
    assert_same_codes(compiled_codes(projected, compensation, coder), want, dead=[1])
    # Lazy batching is an exact reordering of the updates: any block and step give the same codes.
    assert_same_codes(compiled_codes(projected, compensation, coder, block=8, step=3), want, dead=[1])


def test_the_layer_fit_takes_the_compiled_op():
    projected, gram, coder = problem(40, 16, 6, 30, seed=5)
    compensation = Compensation(gram)
    with mock.patch("reparam.kernels.sparse_code.Compensation.run", side_effect=AssertionError("the torch loop ran")):
        got = compensated_codes(projected, compensation, coder)
    assert_same_codes(got, python_codes(projected, compensation, coder))


def test_values_are_least_squares_on_the_support():
    torch.manual_seed(1)
    d, w = torch.randn(40, 16, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
    coder = _Coder(d, 6, None)
    values, support, approximation = sparse_code_column_reference(d.T @ w, coder.contribution, coder.system,
                                                                  coder.gram, 6)
    best = torch.linalg.lstsq(d[:, support], w[:, None]).solution[:, 0]
    torch.testing.assert_close(values, best, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(approximation, d.T @ (d[:, support] @ values), rtol=1e-9, atol=1e-10)


def test_a_system_without_a_cholesky_factor_takes_the_pivoted_solve():
    projected, gram, coder = problem(30, 12, 12, 10, seed=4)
    coder.system = coder.system.clone()
    coder.system.diagonal().mul_(-1)  # indefinite: the factorization stops at its first pivot
    compensation = Compensation(gram)
    assert_same_codes(compiled_codes(projected, compensation, coder), python_codes(projected, compensation, coder))


@pytest.mark.parametrize("change, message", [
    (lambda p, g, n: (p.float(), g, n), "needs projected as a float64 CPU"),
    (lambda p, g, n: (p, g[:, :-1].contiguous(), n), r"needs gram as a contiguous float64 CPU \(12, 12\) matrix, got "
                                                     r"\[12, 11\]"),
    (lambda p, g, n: (p, g, 13), "needs 1 <= nnz <= 12, got 13"),
    (lambda p, g, n: (p, g, 0), "needs 1 <= nnz <= 12, got 0"),
])
def test_bad_arguments_are_named(change, message):
    projected, gram, coder = problem(30, 12, 4, 10, seed=3)
    compensation = Compensation(gram)
    projected, coder.gram, coder.nnz = change(projected, coder.gram, 4)
    with pytest.raises(RuntimeError, match=message):
        compiled_codes(projected, compensation, coder)
