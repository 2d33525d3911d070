"""The factorized layers' compiled forward against two F.linear, on every path it takes or declines."""
import pytest
import torch

from reparam.kernels.extension import compiled_entry, compiled_ops
from reparam.kernels.factor_chain import COMPILED_MAX_TOKENS, factor_chain_linear, factor_chain_reference
from reparam.methods.low_rank import LowRankConfig, LowRankLinear

pytestmark = pytest.mark.skipif(compiled_entry() is None, reason="the compiled kernels could not be built")


@pytest.fixture(params=[0, 1, 2], ids=["scalar", "avx2", "avx512"])
def isa(request):
    ops = compiled_ops()
    if request.param > ops.cpu_isa():
        pytest.skip("this CPU lacks the instruction set")
    previous = ops.set_isa_limit(request.param)
    yield request.param
    ops.set_isa_limit(previous)


@pytest.mark.parametrize("tokens", [1, COMPILED_MAX_TOKENS, COMPILED_MAX_TOKENS + 1])
@pytest.mark.parametrize("in_features, rank, out_features", [(384, 96, 384), (37, 5, 19), (16, 16, 3), (1, 1, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_two_linears(isa, tokens, in_features, rank, out_features, bias):
    torch.manual_seed(tokens + in_features)
    x = torch.randn(tokens, in_features)
    # Scaled so outputs are O(1): the tolerance is then float32 summation-order error.
    first, second = torch.randn(rank, in_features) / in_features ** 0.5, torch.randn(out_features, rank) / rank ** 0.5
    b = torch.randn(out_features) if bias else None
    with torch.no_grad():
        torch.testing.assert_close(factor_chain_linear(x, first, second, b), factor_chain_reference(x, first, second, b),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens", [3, 6, 8])  # one pass of 3; 4 + 2; 4 + 4
def test_several_passes_over_the_weights(isa, tokens):
    x, first, second, b = torch.randn(tokens, 70), torch.randn(9, 70) / 8, torch.randn(33, 9) / 3, torch.randn(33)
    with torch.no_grad():
        y = compiled_entry().factor_chain_linear(x, first, second, b, 8)  # four tokens a pass
    torch.testing.assert_close(y, factor_chain_reference(x, first, second, b), rtol=1e-5, atol=1e-5)


def test_batched_shapes_keep_their_leading_dimensions():
    x, first, second = torch.randn(2, 1, 40), torch.randn(8, 40), torch.randn(24, 8)
    with torch.no_grad():
        y = factor_chain_linear(x, first, second)
    assert y.shape == (2, 1, 24)
    torch.testing.assert_close(y, factor_chain_reference(x, first, second), rtol=1e-5, atol=1e-5)


def test_a_large_rank_threads_over_rows():
    x, first, second = torch.randn(1, 4096), torch.randn(1024, 4096) / 64, torch.randn(4096, 1024) / 32
    with torch.no_grad():
        torch.testing.assert_close(factor_chain_linear(x, first, second), factor_chain_reference(x, first, second),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_other_dtypes_take_the_library_path(dtype):
    x, first, second = (torch.randn(s).to(dtype) for s in ((1, 32), (8, 32), (16, 8)))
    y = factor_chain_linear(x, first, second)
    assert y.dtype == dtype
    assert torch.equal(y, factor_chain_reference(x, first, second))


def test_gradients_flow_when_autograd_records():
    layer = LowRankLinear(24, 16, True, LowRankConfig(rank=4))
    for p in layer.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(1, 24, requires_grad=True)
    layer(x).square().sum().backward()
    grads = [x.grad, *(p.grad for p in layer.parameters())]
    x2 = x.detach().clone().requires_grad_()
    reference = factor_chain_reference(x2, layer.v, layer.u, layer.bias)
    for p in layer.parameters():
        p.grad = None
    reference.square().sum().backward()
    for got, want in zip(grads, [x2.grad, *(p.grad for p in layer.parameters())]):
        torch.testing.assert_close(got, want)


def test_without_avx2_the_library_runs():
    # A portable loop lost to two library GEMVs, so a CPU (or a cap) without AVX2 gets exactly two F.linear.
    ops = compiled_ops()
    previous = ops.set_isa_limit(0)
    try:
        x, first, second, b = torch.randn(3, 70), torch.randn(9, 70), torch.randn(33, 9), torch.randn(33)
        with torch.no_grad():
            y = compiled_entry().factor_chain_linear(x, first, second, b, 8)
        assert torch.equal(y, factor_chain_reference(x, first, second, b))
    finally:
        ops.set_isa_limit(previous)
