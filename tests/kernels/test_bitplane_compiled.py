"""The compiled CPU bit-plane kernels (csrc/bitplane.cpp) against the torch
reference: every instruction-set path, odd shapes, input dtypes, bias, token
counts; the layer's forward, its cache, gradients, and the op registrations."""
import pytest
import torch
import torch.nn.functional as F

from reparam.kernels.bitplane import bitplane_linear, bitplane_reference, decode_weight
from reparam.kernels.extension import compiled_entry, compiled_ops

ops = compiled_ops()
pytestmark = pytest.mark.skipif(ops is None, reason="the C++ extension could not be built here")

ISAS = {0: "scalar", 1: "avx2", 2: "avx512"}
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# (tokens, out, in, bits, group): out not a multiple of the SIMD block, in not of 8 or the group
SHAPES = [(1, 64, 128, 3, 32), (1, 130, 200, 2, 64), (3, 97, 100, 4, 32), (6, 64, 256, 3, 128), (9, 200, 72, 2, 32)]


@pytest.fixture(params=sorted(ISAS), ids=ISAS.get)
def isa(request):
    if request.param > ops.cpu_isa():
        pytest.skip(f"this CPU has no {ISAS[request.param]}")
    previous = ops.set_isa_limit(request.param)
    yield request.param
    ops.set_isa_limit(previous)


def expected_output(x, planes, coef, offset, group, bias):
    """The reference in float64, rounded to the input's dtype."""
    reference = bitplane_reference(x.double(), planes, coef.double(), offset.double(), group,
                                   None if bias is None else bias.double())
    return reference.to(x.dtype)


def assert_close_to_reference(result, x, planes, coef, offset, group, bias):
    expected = expected_output(x, planes, coef, offset, group, bias)
    assert result.dtype == x.dtype and result.shape == expected.shape
    tol = TOLERANCE[x.dtype]
    torch.testing.assert_close(result.float(), expected.float(), rtol=tol, atol=tol)


def assert_within_bf16_bound(result, x, planes, coef, offset, group, bias):
    """Where the CPU has native bf16, decode-and-GEMM multiplies bf16 inputs (and float32 ones under torch's
    "medium" matmul precision) in bf16, as torch multiplies a dense layer's: x and W rounded to bf16 (2^-9
    relative each), float32 sums, the product rounded to bf16 once, then the bias added (and a bf16 output
    rounded again). Elsewhere the float32 path runs, well inside the same bound."""
    weight = decode_weight(planes, coef.double(), offset.double(), group, torch.float64)[:, :x.shape[-1]]
    product = x.double() @ weight.T
    expected = product if bias is None else product + bias.double()
    bound = 2 ** -8 * (x.double().abs() @ weight.abs().T) + 2 ** -9 * (product.abs() + expected.abs()) + 1e-6
    assert result.dtype == x.dtype and ((result.double() - expected).abs() <= bound).all()


@pytest.mark.parametrize("op", ["bitplane_lut", "bitplane_decode_mm"])
@pytest.mark.parametrize("tokens, out_features, in_features, bits, group", SHAPES)
@pytest.mark.parametrize("dtype, bias", [(torch.float32, True), (torch.float16, False), (torch.bfloat16, True)],
                         ids=str)
def test_compiled_matches_reference(isa, op, tokens, out_features, in_features, bits, group, dtype, bias,
                                    random_layer):
    planes, coef, offset, b = random_layer(out_features, in_features, bits, group)
    x = torch.randn(tokens, in_features).to(dtype)
    b = b if bias else None
    result = getattr(ops, op)(x, planes, coef, offset, group, b)
    check = assert_within_bf16_bound if op == "bitplane_decode_mm" and dtype == torch.bfloat16 \
        else assert_close_to_reference
    check(result, x, planes, coef, offset, group, b)


@pytest.mark.parametrize("tokens", [1, 5, 17, 40])  # the LUT in passes of 4 tokens; above 16, the measured choice
def test_dispatch_matches_reference_on_batched_shapes(tokens, random_layer):
    planes, coef, offset, b = random_layer(96, 160, 3, 32)
    x = torch.randn(tokens, 2, 160)[:, 1]  # a non-contiguous input
    result = bitplane_linear(x, planes, coef, offset, 32, b)
    assert_close_to_reference(result, x, planes, coef, offset, 32, b)


@pytest.mark.parametrize("dtype, bias", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, True)],
                         ids=str)
def test_decode_mm_over_several_input_blocks(isa, dtype, bias, random_layer):
    # 1100 inputs: two 1024-column blocks accumulated by the GEMM (the second 96 wide); 130 outputs: a full and a
    # 2-wide output tile; float32 outputs take the GEMM in place, others through a float tile
    planes, coef, offset, b = random_layer(130, 1100, 3, 32)
    x = torch.randn(20, 1100).to(dtype)
    b = b if bias else None
    check = assert_within_bf16_bound if dtype == torch.bfloat16 else assert_close_to_reference
    check(ops.bitplane_decode_mm(x, planes, coef, offset, 32, b), x, planes, coef, offset, 32, b)


@pytest.fixture
def bf16_float32_matmuls():
    """torch's "medium" float32 matmul precision: bf16 products (torch.backends.mkldnn.matmul.fp32_precision)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    yield
    torch.set_float32_matmul_precision(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decode_mm_in_bf16_stays_within_its_rounding_bound(isa, dtype, bf16_float32_matmuls, random_layer):
    # 1100 inputs and 1300 outputs: two GEMM chunks of outputs, the second 276 wide
    planes, coef, offset, b = random_layer(1300, 1100, 3, 32)
    x = torch.randn(20, 1100).to(dtype)
    assert_within_bf16_bound(ops.bitplane_decode_mm(x, planes, coef, offset, 32, b), x, planes, coef, offset, 32, b)


@pytest.mark.parametrize("op", ["bitplane_lut", "bitplane_decode_mm"])
def test_no_tokens_give_an_empty_output(op, random_layer):
    planes, coef, offset, b = random_layer(40, 64, 3, 32)
    assert getattr(ops, op)(torch.randn(0, 64), planes, coef, offset, 32, b).shape == (0, 40)


PINNED = 70  # a crossover above the LUT's 64-token chunks


@pytest.fixture
def pinned_crossover():
    """The LUT/decode-and-GEMM crossover of 3-plane layers pinned to PINNED tokens, unpinned after."""
    previous = ops.set_lut_crossover(3, PINNED)
    yield PINNED
    ops.set_lut_crossover(3, previous)


# Up to 16 tokens the LUT always runs; above, up to the crossover, unless decode-and-GEMM multiplies in bf16.
@pytest.mark.parametrize("dtype, tokens, kernel", [
    *[(dtype, tokens, "bitplane_lut") for dtype in (torch.float32, torch.float16) for tokens in (1, 16, 20, PINNED)],
    *[(dtype, PINNED + 1, "bitplane_decode_mm") for dtype in (torch.float32, torch.float16, torch.bfloat16)],
    (torch.bfloat16, 16, "bitplane_lut")], ids=str)
def test_linear_picks_the_kernel_by_tokens(dtype, tokens, kernel, pinned_crossover, random_layer):
    planes, coef, offset, b = random_layer(70, 96, 3, 32)
    x = torch.randn(tokens, 96).to(dtype)
    expected = getattr(ops, kernel)(x, planes, coef, offset, 32, b)
    torch.testing.assert_close(ops.bitplane_linear(x, planes, coef, offset, 32, b), expected, rtol=0, atol=0)
    torch.testing.assert_close(compiled_entry().bitplane_linear(x, planes, coef, offset, 32, b), expected,
                               rtol=0, atol=0)


def test_lut_over_several_token_chunks_matches_reference(pinned_crossover, random_layer):
    planes, coef, offset, b = random_layer(130, 96, 3, 32)
    x = torch.randn(PINNED, 96)
    assert_close_to_reference(ops.bitplane_linear(x, planes, coef, offset, 32, b), x, planes, coef, offset, 32, b)


def test_the_crossover_is_measured_once_and_can_be_pinned():
    previous = ops.set_lut_crossover(2, -1)  # unpinned: the measured one
    try:
        measured = ops.lut_crossover(2)
        assert measured in (16, 32, 64, 128, 256, 2 ** 63 - 1)  # the probes, or no limit
        assert ops.lut_crossover(2) == measured  # kept, not measured again (another measurement could differ)
        assert ops.set_lut_crossover(2, 5) == -1
        assert ops.lut_crossover(2) == 5
        assert ops.set_lut_crossover(2, -1) == 5
        assert ops.lut_crossover(2) == measured
    finally:
        ops.set_lut_crossover(2, previous)
    with pytest.raises(RuntimeError, match="lut_crossover takes 1 to 8 planes, got 9"):
        ops.lut_crossover(9)


def test_eager_entry_records_autograd_only_when_needed(random_layer):
    planes, coef, offset, b = random_layer(70, 96, 3, 32)
    x = torch.randn(2, 96, requires_grad=True)
    entry = compiled_entry().bitplane_linear
    assert entry(x, planes, coef, offset, 32, b).grad_fn is not None
    assert entry(x.detach(), planes, coef, offset, 32, b.requires_grad_()).grad_fn is not None
    assert entry(x.detach(), planes, coef, offset, 32, b.detach()).grad_fn is None
    with torch.no_grad():
        assert entry(x, planes, coef, offset, 32, b.requires_grad_()).grad_fn is None


@pytest.mark.parametrize("op", ["bitplane_lut", "bitplane_decode_mm"])
def test_coefficients_in_any_strides(isa, op, random_layer):
    planes, coef, offset, b = random_layer(130, 200, 3, 64)
    x = torch.randn(2, 200)
    outputs_contiguous = coef.transpose(1, 2).contiguous().transpose(1, 2), offset.T.contiguous().T
    result = getattr(ops, op)(x, planes, *outputs_contiguous, 64, b)
    assert_close_to_reference(result, x, planes, coef, offset, 64, b)


def test_wrong_coefficient_shape_is_refused(random_layer):
    planes, coef, offset, b = random_layer(64, 64, 3, 32)
    expected = r"coef must be float32 \(bits, out, groups\) = \(3, 64, 2\), got \[3, 2, 64\]"
    with pytest.raises(RuntimeError, match=expected):
        ops.bitplane_lut(torch.randn(1, 64), planes, coef.transpose(1, 2), offset, 32, b)


def shift_add_layer(in_features=96, out_features=70, bias=True):
    """A shift_add layer with random planes and scales (a fit is not what is tested here)."""
    from reparam.methods.shift_add import ShiftAddConfig, ShiftAddLinear

    layer = ShiftAddLinear(in_features, out_features, bias, ShiftAddConfig(bits=3, group_size=32))
    with torch.no_grad():
        layer.planes.copy_(torch.randint(0, 256, layer.planes.shape, dtype=torch.uint8))
        layer.params.copy_(torch.rand(layer.params.shape) * 0.1)
        if bias:
            layer.bias.normal_()
    return layer


def test_layer_forward_follows_its_params():
    layer = shift_add_layer()
    x = torch.randn(2, 96)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.materialize(), layer.bias), rtol=1e-5, atol=1e-5)
        layer.params.mul_(2)  # an in-place change must not leave a stale cached linear form
        torch.testing.assert_close(layer(x), F.linear(x, layer.materialize(), layer.bias), rtol=1e-5, atol=1e-5)
        layer.params = layer.params * 0.5  # nor a new tensor
        torch.testing.assert_close(layer(x), F.linear(x, layer.materialize(), layer.bias), rtol=1e-5, atol=1e-5)


def test_a_layer_built_under_inference_mode_follows_its_params():
    # Inference tensors keep no version counter, so the layer must not cache what it cannot invalidate.
    with torch.inference_mode():
        layer = shift_add_layer()
        x = torch.randn(2, 96)
        torch.testing.assert_close(layer(x), F.linear(x, layer.materialize(), layer.bias), rtol=1e-5, atol=1e-5)
        layer.params.mul_(2)
        torch.testing.assert_close(layer(x), F.linear(x, layer.materialize(), layer.bias), rtol=1e-5, atol=1e-5)


def test_layer_without_bias():
    layer = shift_add_layer(bias=False)
    x = torch.randn(2, 96)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ layer.materialize().T, rtol=1e-5, atol=1e-5)


def test_gradients_through_the_compiled_op_match_the_dense_layer():
    layer = shift_add_layer()
    x = torch.randn(3, 96, requires_grad=True)
    layer(x).square().sum().backward()
    grad_x, grad_bias = x.grad.clone(), layer.bias.grad.clone()
    x.grad, layer.bias.grad = None, None
    weight = layer.materialize().detach()
    F.linear(x, weight, layer.bias).square().sum().backward()
    torch.testing.assert_close(grad_x, x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_bias, layer.bias.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("op", ["bitplane_lut", "bitplane_decode_mm", "bitplane_linear"])
def test_op_registration_passes_opcheck(op, random_layer):
    planes, coef, offset, b = random_layer(64, 96, 2, 32)
    x = torch.randn(2, 96, requires_grad=True)
    torch.library.opcheck(getattr(ops, op).default, (x, planes, coef, offset, 32, b.requires_grad_()))


def test_compiled_graph_keeps_the_op_whole():
    layer = shift_add_layer()
    x = torch.randn(1, 96)
    with torch.no_grad():
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), layer(x))


def test_gradients_through_the_threaded_decode_path(pinned_crossover):
    # Several output tiles at 2 threads: the GEMMs of OpenMP's worker threads must not see x's autograd
    # (the op's autograd wrapper excludes it only on the calling thread); LoRA on a compressed layer does this.
    layer = shift_add_layer(out_features=300)
    x = torch.randn(pinned_crossover + 8, 96, requires_grad=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        layer(x).square().sum().backward()
    finally:
        torch.set_num_threads(threads)
    expected = x.detach().clone().requires_grad_()
    F.linear(expected, layer.materialize().detach(), layer.bias).square().sum().backward()
    torch.testing.assert_close(x.grad, expected.grad, rtol=1e-4, atol=1e-4)
