"""y = x·Wᵀ for a weight stored as bit-planes (shift-add and affine layers).

The weight is W[o, j] = Σ_i coef[i, o, g]·bit_i[o, j] + offset[o, g], with
g = j // group_size, bit-planes packed 8 columns per byte (see
``reparam.core.bitpack``) and rows padded to whole groups. Planes are stored
byte-major, (bits, in/8, out): the bytes of one input chunk for all outputs
are contiguous, which is what a CPU gather and coalesced GPU loads want.

- ``bitplane_reference``: decode W, then a dense matmul. The definition.
- ``bitplane_lut``: LUT-GEMM (Park et al. 2024) for few tokens. For every 8
  activations the 256 possible partial sums Σ_k bit_k·x_k are tabulated once;
  a byte of a plane then indexes the table, so a row costs one lookup per 8
  weights per plane, and the scales apply once per group. No weight is
  decoded; the lookups are one ``torch.gather`` per plane.
- ``bitplane_triton``: a CUDA kernel that decodes a tile of W in registers and
  feeds it to ``tl.dot``; W never exists in memory. For many tokens.
- ``bitplane_gemv``: a split-K CUDA kernel for 1–16 tokens: each program
  decodes a (BLOCK_O, 32) tile of W in registers for each K step it owns and
  adds its partial products to y atomically; tile sizes are autotuned.
- The compiled CPU kernels (``csrc/bitplane.cpp``, see ``extension``):
  ``bitplane_lut``, T-MAC-style exact float tables of 16 partial sums per 4
  activations looked up with SIMD permutes, and ``bitplane_decode_mm``,
  decode tile by tile into a reused buffer and GEMM.

``bitplane_linear`` picks: on CUDA the GEMV kernel up to ``GEMV_MAX_TOKENS``
tokens and the tiled one above; on CPU the compiled op ``bitplane_linear``,
which runs the LUT up to a crossover token count it measures on the machine
the first time it needs it (``csrc/bitplane_choice.cpp``; ``lut_crossover``
reads it, ``set_lut_crossover`` pins it) and decode-and-GEMM above; or, when
the extension cannot be built, the torch LUT and decode-and-matmul.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernel is optional: CPU paths need only torch
    triton = None

from ..core.bitpack import from_planes, to_planes
from .extension import compiled_entry, compiled_ops

TORCH_LUT_MAX_TOKENS = 16  # the torch fallback's crossover (benchmarks/bench_shift_add.py)
GEMV_MAX_TOKENS = 16
_LUT_CHUNK = 1 << 22  # lookups per step, bounding the LUT's scratch memory
_BYTE_BITS = ((torch.arange(256) >> torch.arange(8)[:, None]) & 1).float()  # (8, 256): bit k of byte v


def planes_from_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (out, padded in) → byte-major planes (bits, padded in / 8, out)."""
    return to_planes(codes, bits).transpose(1, 2).contiguous()


def codes_from_planes(planes: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`planes_from_codes`."""
    return from_planes(planes.transpose(1, 2), planes.shape[1] * 8)


def decode_weight(planes: torch.Tensor, coef: torch.Tensor, offset: torch.Tensor, group_size: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """The (out, padded in) weight in ``dtype``."""
    out_features, groups = offset.shape
    weight = offset.to(dtype)[:, :, None].expand(out_features, groups, group_size).contiguous()
    # unpack_bits with shifts made here: a module-level tensor would break fake-tensor tracing (torch.compile).
    shifts = torch.arange(8, dtype=torch.uint8, device=planes.device)
    for plane, c in zip(planes, coef.to(dtype)):
        bits = (plane.T.unsqueeze(-1) >> shifts & 1).reshape(out_features, groups, group_size)
        weight.addcmul_(bits.to(dtype), c[:, :, None])
    return weight.view(out_features, groups * group_size)


def _padded(x: torch.Tensor, columns: int) -> torch.Tensor:
    return F.pad(x, (0, columns - x.shape[-1])) if x.shape[-1] != columns else x


def bitplane_reference(x, planes, coef, offset, group_size, bias=None):
    """Decode the weight in the input's dtype, then ``F.linear``."""
    weight = decode_weight(planes, coef, offset, group_size, x.dtype)
    return F.linear(_padded(x, weight.shape[1]), weight, bias)


def bitplane_lut(x, planes, coef, offset, group_size, bias=None):
    """LUT-GEMM on CPU; computes in float32 whatever the input dtype."""
    out_features, groups = offset.shape
    shape, dtype = x.shape, x.dtype
    nbytes = planes.shape[1]
    x = _padded(x.reshape(-1, shape[-1]).float(), nbytes * 8)
    tables = x.view(-1, nbytes, 8) @ _BYTE_BITS  # (tokens, nbytes, 256)
    y = x.view(-1, groups, group_size).sum(-1) @ offset.float().T  # the offset's share
    coef = coef.float().transpose(1, 2).contiguous()  # (bits, groups, out)
    step = max(1, _LUT_CHUNK // nbytes)
    for first in range(0, out_features, step):
        last = min(first + step, out_features)
        for plane, c in zip(planes[:, :, first:last], coef[:, :, first:last]):
            index = plane.long()  # gather wants int64; one plane's chunk at a time
            for token, table in enumerate(tables):
                sums = table.gather(1, index).view(groups, group_size // 8, -1).sum(1)  # (groups, chunk)
                y[token, first:last] += (sums * c).sum(0)
    if bias is not None:
        y += bias.float()
    return y.to(dtype).view(*shape[:-1], out_features)


def register_compiled_ops() -> None:
    """Shape-only and backward formulas for the compiled bit-plane ops (``reparam_cpu::bitplane_*``)."""
    def fake(x, planes, coef, offset, group_size, bias):
        return x.new_empty(*x.shape[:-1], planes.shape[2])

    def setup_context(ctx, inputs, output):
        x, planes, coef, offset, group_size, bias = inputs
        ctx.save_for_backward(planes, coef, offset)
        ctx.group_size, ctx.in_features, ctx.has_bias = group_size, x.shape[-1], bias is not None

    def backward(ctx, grad):
        # Only x and the bias train: planes are codes, coef and offset are derived from stored params.
        planes, coef, offset = ctx.saved_tensors
        weight = decode_weight(planes, coef, offset, ctx.group_size, grad.dtype)[:, :ctx.in_features]
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
        return grad @ weight, None, None, None, None, grad_bias

    for name in ("reparam_cpu::bitplane_lut", "reparam_cpu::bitplane_decode_mm", "reparam_cpu::bitplane_linear"):
        torch.library.register_fake(name, fake)
        torch.library.register_autograd(name, backward, setup_context=setup_context)


def bitplane_linear(x, planes, coef, offset, group_size, bias=None):
    """The forward of a bit-plane layer on any device; ``coef`` and ``offset`` float32."""
    if x.is_cpu:
        entry = compiled_entry()
        if entry is not None:
            if torch.compiler.is_compiling():  # traced: the registered op, a single graph node
                return compiled_ops().bitplane_linear(x, planes, coef, offset, group_size, bias)
            return entry.bitplane_linear(x, planes, coef, offset, group_size, bias)  # csrc/python_entry.cpp
    elif x.is_cuda and triton is not None:
        kernel = bitplane_gemv if x.numel() // x.shape[-1] <= GEMV_MAX_TOKENS else bitplane_triton
        return kernel(x, planes, coef, offset, group_size, bias)
    if x.numel() // x.shape[-1] <= TORCH_LUT_MAX_TOKENS:
        return bitplane_lut(x, planes, coef, offset, group_size, bias)
    return bitplane_reference(x, planes, coef, offset, group_size, bias)


if triton is not None:

    @triton.jit
    def _decode_tile(planes_ptr, coef_ptr, offset_ptr, cols, ro, o_ok, g, out_features, nbytes,
                     coef_si, coef_so, coef_sg, offset_so, offset_sg,
                     BITS: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr):
        """The (BLOCK_O, BLOCK_K) float32 tile of W at outputs ``ro`` and columns ``cols`` (all in group ``g``)."""
        shift = (cols % 8).to(tl.uint8)
        w = tl.zeros((BLOCK_O, BLOCK_K), dtype=tl.float32)
        for i in tl.static_range(BITS):
            byte = tl.load(planes_ptr + (i * nbytes + cols[None, :] // 8) * out_features + ro[:, None],
                           mask=o_ok[:, None], other=0)
            c = tl.load(coef_ptr + i * coef_si + ro * coef_so + g * coef_sg, mask=o_ok, other=0.0)
            w += ((byte >> shift[None, :]) & 1).to(tl.float32) * c.to(tl.float32)[:, None]
        return w + tl.load(offset_ptr + ro * offset_so + g * offset_sg, mask=o_ok, other=0.0).to(tl.float32)[:, None]

    @triton.jit
    def _bitplane_kernel(x_ptr, planes_ptr, coef_ptr, offset_ptr, bias_ptr, y_ptr,
                         tokens, out_features, in_features, groups, nbytes,
                         coef_si, coef_so, coef_sg, offset_so, offset_sg,
                         BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr):
        # One (BLOCK_T, BLOCK_O) tile of y; K tiles never straddle a group
        # (BLOCK_K divides GROUP), so each needs one scale per plane and row.
        rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        ro = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
        rk = tl.arange(0, BLOCK_K)
        t_ok = rt < tokens
        o_ok = ro < out_features
        acc = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)
        for k0 in range(0, groups * GROUP, BLOCK_K):
            cols = k0 + rk
            x = tl.load(x_ptr + rt[:, None] * in_features + cols[None, :],
                        mask=t_ok[:, None] & (cols[None, :] < in_features), other=0.0)
            w = _decode_tile(planes_ptr, coef_ptr, offset_ptr, cols, ro, o_ok, k0 // GROUP, out_features, nbytes,
                             coef_si, coef_so, coef_sg, offset_so, offset_sg, BITS, BLOCK_O, BLOCK_K)
            acc += tl.dot(x.to(tl.float32), tl.trans(w))
        if HAS_BIAS:
            acc += tl.load(bias_ptr + ro, mask=o_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rt[:, None] * out_features + ro[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=t_ok[:, None] & o_ok[None, :])


def bitplane_triton(x, planes, coef, offset, group_size, bias=None):
    """The Triton kernel (CUDA; on CPU only under ``TRITON_INTERPRET=1``); coef and offset in any strides."""
    if triton is None:
        raise RuntimeError("bitplane_triton needs triton: pip install 'reparam[kernels]'")
    out_features, groups = offset.shape
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    tokens = x2.shape[0]
    y = torch.empty(tokens, out_features, device=x.device, dtype=x.dtype)
    block_k = 32  # group sizes are multiples of 32
    grid = (triton.cdiv(tokens, 16), triton.cdiv(out_features, 32))
    _bitplane_kernel[grid](x2, planes.contiguous(), coef, offset, bias if bias is not None else offset, y,
                           tokens, out_features, shape[-1], groups, planes.shape[1], *coef.stride(), *offset.stride(),
                           BITS=planes.shape[0], GROUP=group_size, HAS_BIAS=bias is not None,
                           BLOCK_T=16, BLOCK_O=32, BLOCK_K=block_k)
    return y.view(*shape[:-1], out_features)


if triton is not None:

    @triton.jit
    def _bitplane_gemv_kernel(x_ptr, planes_ptr, coef_ptr, offset_ptr, y_ptr,
                              tokens, out_features, in_features, nbytes, k_steps,
                              coef_si, coef_so, coef_sg, offset_so, offset_sg,
                              BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_T: tl.constexpr,
                              BLOCK_O: tl.constexpr, SPLIT_K: tl.constexpr):
        # Program (o, k) owns outputs [o·BLOCK_O, +BLOCK_O) and K steps k, k + SPLIT_K, …
        # of 32 columns (one group's slice: group sizes are multiples of 32). The
        # (BLOCK_O, 32) weight tile is decoded in registers, multiplied with the
        # (BLOCK_T, 32) activations (broadcast-and-sum below 16 tokens, tl.dot from 16),
        # and the (BLOCK_T, BLOCK_O) partial sum added to the float32 y atomically.
        BLOCK_K: tl.constexpr = 32
        ro = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
        rt = tl.arange(0, BLOCK_T)
        rk = tl.arange(0, BLOCK_K)
        o_ok = ro < out_features
        t_ok = rt < tokens
        acc = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)
        for step in range(tl.program_id(1), k_steps, SPLIT_K):
            cols = step * BLOCK_K + rk
            x = tl.load(x_ptr + rt[:, None] * in_features + cols[None, :],
                        mask=t_ok[:, None] & (cols[None, :] < in_features), other=0.0).to(tl.float32)
            w = _decode_tile(planes_ptr, coef_ptr, offset_ptr, cols, ro, o_ok, step * BLOCK_K // GROUP, out_features,
                             nbytes, coef_si, coef_so, coef_sg, offset_so, offset_sg, BITS, BLOCK_O, BLOCK_K)
            if BLOCK_T >= 16:  # enough rows for the matrix units; ieee keeps float32 exact (no tf32)
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
        tl.atomic_add(y_ptr + rt[:, None] * out_features + ro[None, :], acc, mask=t_ok[:, None] & o_ok[None, :])

    GEMV_CONFIGS = [triton.Config({"BLOCK_O": block_o, "SPLIT_K": split_k}, num_warps=warps)
                    for block_o, warps in ((32, 2), (64, 4), (128, 4)) for split_k in (1, 4, 16)]
    # Autotuning times configs on the GPU; the interpreter (CPU) runs the plain kernel with a given config.
    _bitplane_gemv_tuned = triton.autotune(configs=GEMV_CONFIGS, key=["out_features", "k_steps", "BLOCK_T"],
                                           reset_to_zero=["y_ptr"])(_bitplane_gemv_kernel)


def bitplane_gemv(x, planes, coef, offset, group_size, bias=None, config: dict | None = None):
    """The split-K Triton GEMV for 1–16 tokens (CUDA; on CPU only under ``TRITON_INTERPRET=1``).

    ``config`` ({"BLOCK_O": …, "SPLIT_K": …}) fixes the tiling; by default CUDA
    autotunes over ``GEMV_CONFIGS`` and the interpreter uses BLOCK_O=32, SPLIT_K=4.
    """
    if triton is None:
        raise RuntimeError("bitplane_gemv needs triton: pip install 'reparam[kernels]'")
    out_features, groups = offset.shape
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    tokens = x2.shape[0]
    if tokens > GEMV_MAX_TOKENS:
        raise ValueError(f"bitplane_gemv takes at most {GEMV_MAX_TOKENS} tokens, got {tokens}; use bitplane_triton")
    y = torch.zeros(tokens, out_features, device=x.device, dtype=torch.float32)  # split-K partial sums land here
    k_steps = groups * group_size // 32
    grid = lambda meta: (triton.cdiv(out_features, meta["BLOCK_O"]), meta["SPLIT_K"])  # noqa: E731
    if config is None and x.is_cuda:
        kernel, config = _bitplane_gemv_tuned, {}
    else:
        kernel, config = _bitplane_gemv_kernel, config or {"BLOCK_O": 32, "SPLIT_K": 4}
    kernel[grid](x2, planes.contiguous(), coef, offset, y,
                 tokens, out_features, shape[-1], planes.shape[1], k_steps, *coef.stride(), *offset.stride(),
                 BITS=planes.shape[0], GROUP=group_size, BLOCK_T=triton.next_power_of_2(tokens), **config)
    if bias is not None:
        y += bias
    return y.to(x.dtype).view(*shape[:-1], out_features)
