"""The dense-sparse forward paths (Triton under TRITON_INTERPRET=1, CPU)
against the torch reference that defines them."""
import pytest
import torch

from reparam.kernels.dense_sparse import (dense_sparse_cpu, dense_sparse_linear, dense_sparse_reference,
                                          sparse_codes_triton, sparse_to_dense)


def random_factors(out_features, in_features, atoms, nnz, index_dtype=torch.uint8):
    indices = torch.stack([torch.randperm(atoms)[:nnz].sort().values for _ in range(in_features)], 1)
    return torch.randn(out_features, atoms), torch.randn(nnz, in_features), indices.to(index_dtype)


def test_sparse_to_dense_places_each_value_in_its_atom():
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    indices = torch.tensor([[0, 1], [2, 3]], dtype=torch.uint8)
    assert sparse_to_dense(values, indices, 4).tolist() == [[1, 0], [0, 2], [3, 0], [0, 4]]


@pytest.mark.parametrize("tokens, out_features, in_features, atoms, nnz",
                         [(1, 24, 40, 16, 5), (19, 40, 70, 48, 20), (3, 8, 33, 33, 1)])
def test_triton_codes_match_reference(tokens, out_features, in_features, atoms, nnz):
    d, values, indices = random_factors(out_features, in_features, atoms, nnz)
    x = torch.randn(tokens, in_features)
    expected = x @ sparse_to_dense(values, indices, atoms).T
    torch.testing.assert_close(sparse_codes_triton(x, values, indices, atoms), expected, rtol=1e-4, atol=1e-4)


def test_triton_codes_in_half_precision_with_int16_indices():
    d, values, indices = random_factors(16, 64, 300, 4, torch.int16)
    x = torch.randn(2, 5, 64).half()
    expected = (x.float() @ sparse_to_dense(values, indices, 300).T).half()
    result = sparse_codes_triton(x, values.half(), indices, 300)
    assert result.shape == (2, 5, 300)
    torch.testing.assert_close(result, expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [(1,), (2, 1), (4, 7)])  # the scatter-add path, then the dense-S one
def test_cpu_path_matches_reference(bias, batch):
    d, values, indices = random_factors(30, 50, 20, 6)
    b = torch.randn(30) if bias else None
    x = torch.randn(*batch, 50)
    torch.testing.assert_close(dense_sparse_cpu(x, d, values, indices, b),
                               dense_sparse_reference(x, d, values, indices, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense_sparse_linear(x, d, values, indices, b),
                               dense_sparse_reference(x, d, values, indices, b), rtol=1e-5, atol=1e-5)
