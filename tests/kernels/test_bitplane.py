"""The bit-plane forward paths (Triton under TRITON_INTERPRET=1, the CPU
LUT) against the torch reference that defines them."""
import pytest
import torch

from reparam.kernels.bitplane import (bitplane_gemv, bitplane_linear, bitplane_lut, bitplane_reference,
                                      bitplane_triton, codes_from_planes, decode_weight)


def test_decode_follows_the_linear_form(random_layer):
    planes, coef, offset, _ = random_layer(5, 64, 3, 32)
    weight = decode_weight(planes, coef, offset, 32, torch.float64)
    codes = codes_from_planes(planes)
    for o, j in [(0, 0), (4, 63), (2, 31), (3, 32)]:
        bits = [(int(codes[o, j]) >> i) & 1 for i in range(3)]
        expected = sum(float(coef[i, o, j // 32]) * bits[i] for i in range(3)) + float(offset[o, j // 32])
        assert float(weight[o, j]) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("tokens, out_features, in_features, bits, group_size",
                         [(1, 40, 64, 3, 32), (5, 33, 100, 2, 32), (17, 64, 128, 4, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_triton_matches_reference(tokens, out_features, in_features, bits, group_size, bias, random_layer):
    planes, coef, offset, b = random_layer(out_features, in_features, bits, group_size)
    x = torch.randn(tokens, in_features)
    b = b if bias else None
    torch.testing.assert_close(bitplane_triton(x, planes, coef, offset, group_size, b),
                               bitplane_reference(x, planes, coef, offset, group_size, b), rtol=1e-4, atol=1e-4)


def test_triton_in_half_precision_and_batched_shapes(random_layer):
    planes, coef, offset, b = random_layer(48, 96, 3, 32)
    x = torch.randn(2, 3, 96).half()
    expected = bitplane_reference(x.float(), planes, coef, offset, 32, b).half()
    result = bitplane_triton(x, planes, coef, offset, 32, b.half())
    assert result.shape == (2, 3, 48) and result.dtype == torch.float16
    torch.testing.assert_close(result, expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("config", [{"BLOCK_O": 32, "SPLIT_K": 4}, {"BLOCK_O": 64, "SPLIT_K": 1}], ids=str)
@pytest.mark.parametrize("tokens, out_features, in_features, bits, group_size",
                         [(1, 40, 64, 3, 32), (3, 33, 100, 2, 32), (16, 70, 200, 4, 64)])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)],
                         ids=str)
def test_gemv_matches_reference(config, tokens, out_features, in_features, bits, group_size, dtype, tol,
                                random_layer):
    planes, coef, offset, b = random_layer(out_features, in_features, bits, group_size)
    x = torch.randn(tokens, in_features).to(dtype)
    b = b if tokens != 3 else None  # with and without bias
    expected = bitplane_reference(x.double(), planes, coef.double(), offset.double(), group_size,
                                  None if b is None else b.double()).to(dtype)
    result = bitplane_gemv(x, planes, coef, offset, group_size, b, config=config)
    assert result.dtype == dtype and result.shape == expected.shape
    torch.testing.assert_close(result.float(), expected.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("kernel", [bitplane_gemv, bitplane_triton])
def test_triton_kernels_take_coefficients_in_any_strides(kernel, random_layer):
    planes, coef, offset, b = random_layer(70, 100, 3, 32)
    x = torch.randn(4, 100)
    outputs_contiguous = coef.transpose(1, 2).contiguous().transpose(1, 2), offset.T.contiguous().T  # as layers cache
    torch.testing.assert_close(kernel(x, planes, *outputs_contiguous, 32, b),
                               bitplane_reference(x, planes, coef, offset, 32, b), rtol=1e-5, atol=1e-5)


def test_gemv_refuses_more_tokens_than_it_serves(random_layer):
    planes, coef, offset, _ = random_layer(32, 64, 2, 32)
    with pytest.raises(ValueError, match="bitplane_gemv takes at most 16 tokens, got 17; use bitplane_triton"):
        bitplane_gemv(torch.randn(17, 64), planes, coef, offset, 32)


@pytest.mark.parametrize("tokens", [1, 3, 8])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_lut_matches_reference(tokens, dtype, tol, random_layer):
    planes, coef, offset, b = random_layer(70, 200, 3, 64)  # 200 columns: a padded last group
    x = torch.randn(tokens, 200)
    expected = bitplane_reference(x, planes, coef, offset, 64, b)
    result = bitplane_lut(x.to(dtype), planes, coef, offset, 64, b.to(dtype))
    assert result.dtype == dtype
    torch.testing.assert_close(result.float(), expected, rtol=tol, atol=tol)


def test_lut_in_chunks_matches_reference(monkeypatch, random_layer):
    import reparam.kernels.bitplane as kernel
    monkeypatch.setattr(kernel, "_LUT_CHUNK", 8)  # one output row per step
    planes, coef, offset, b = random_layer(9, 64, 2, 32)
    x = torch.randn(2, 64)
    torch.testing.assert_close(bitplane_lut(x, planes, coef, offset, 32, b),
                               bitplane_reference(x, planes, coef, offset, 32, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens", [1, 64])  # both CPU paths (compiled where the extension builds)
def test_dispatch_on_cpu_matches_reference(tokens, random_layer):
    planes, coef, offset, b = random_layer(16, 64, 3, 32)
    x = torch.randn(tokens, 64)
    torch.testing.assert_close(bitplane_linear(x, planes, coef, offset, 32, b),
                               bitplane_reference(x, planes, coef, offset, 32, b), rtol=1e-5, atol=1e-5)
