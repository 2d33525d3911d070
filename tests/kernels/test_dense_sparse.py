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


def compiled_ops_or_skip():
    from reparam.kernels.extension import compiled_ops

    ops = compiled_ops()
    if ops is None:
        pytest.skip("the C++ extension could not be built here")
    return ops


@pytest.mark.parametrize("index_dtype", [torch.uint8, torch.int16, torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)],
                         ids=str)
@pytest.mark.parametrize("tokens, bias", [(1, True), (3, False), (8, True)])
def test_compiled_path_matches_reference(index_dtype, dtype, tol, tokens, bias):
    ops = compiled_ops_or_skip()
    d, values, indices = random_factors(31, 45, 20, 6, index_dtype)
    d, values = d.to(dtype), values.to(dtype)
    b = torch.randn(31).to(dtype) if bias else None
    x = torch.randn(tokens, 45).to(dtype)
    expected = dense_sparse_reference(x.double(), d.double(), values.double(), indices,
                                      None if b is None else b.double()).to(dtype)
    result = ops.dense_sparse_linear(x, d, values, indices, b)
    assert result.dtype == dtype and result.shape == expected.shape
    # Half types round z = x·Sᵀ before the GEMM with D: errors scale with the largest output.
    scale = float(expected.abs().max())
    torch.testing.assert_close(result.float(), expected.float(), rtol=tol, atol=tol * scale)


def test_compiled_path_refuses_an_index_outside_the_dictionary():
    ops = compiled_ops_or_skip()
    d, values, indices = random_factors(8, 10, 5, 2)
    indices[1, 3] = 7
    with pytest.raises(RuntimeError, match=r"dense_sparse index 7 outside \[0, 5\)"):
        ops.dense_sparse_linear(torch.randn(1, 10), d, values, indices, None)


def test_compiled_path_gradients_and_registration():
    ops = compiled_ops_or_skip()
    d, values, indices = random_factors(12, 20, 8, 3)
    inputs = [torch.randn(2, 20), d, values]
    torch.library.opcheck(ops.dense_sparse_linear.default,
                          (*[t.requires_grad_() for t in inputs], indices, torch.randn(12, requires_grad=True)))
    ops.dense_sparse_linear(*inputs, indices, None).square().sum().backward()
    grads = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    dense_sparse_reference(*inputs, indices).square().sum().backward()
    for grad, t in zip(grads, inputs):
        torch.testing.assert_close(grad, t.grad, rtol=1e-4, atol=1e-4)


def test_layer_inference_with_cached_dense_s_follows_its_codes():
    from reparam.methods.dense_sparse import DenseSparseConfig, DenseSparseLinear

    layer = DenseSparseLinear(40, 30, True, DenseSparseConfig(atoms=12, nnz=4))
    d, values, indices = random_factors(30, 40, 12, 4)
    with torch.no_grad():
        layer.d.copy_(d), layer.values.copy_(values), layer.indices.copy_(indices), layer.bias.normal_()
        x = torch.randn(3, 40)
        torch.testing.assert_close(layer(x), dense_sparse_reference(x, layer.d, layer.values, layer.indices,
                                                                    layer.bias), rtol=1e-5, atol=1e-5)
        layer.values.mul_(-2)  # an in-place change must not leave a stale cached S
        torch.testing.assert_close(layer(x), dense_sparse_reference(x, layer.d, layer.values, layer.indices,
                                                                    layer.bias), rtol=1e-5, atol=1e-5)
    x.requires_grad_()
    layer(x).sum().backward()  # with autograd on, the differentiable path: values get their gradient
    assert layer.values.grad is not None and layer.values.grad.abs().sum() > 0


def test_a_layer_built_under_inference_mode_follows_its_codes():
    # Inference tensors keep no version counter: the layer must not cache what it cannot invalidate.
    from reparam.methods.dense_sparse import DenseSparseConfig, DenseSparseLinear

    with torch.inference_mode():
        layer = DenseSparseLinear(40, 30, True, DenseSparseConfig(atoms=12, nnz=4)).eval()
        d, values, indices = random_factors(30, 40, 12, 4)
        layer.d.copy_(d), layer.values.copy_(values), layer.indices.copy_(indices)
        x = torch.randn(2, 40)
        for _ in range(2):
            expected = dense_sparse_reference(x, layer.d, layer.values, layer.indices, layer.bias)
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
            layer.values.mul_(-2)
