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
  feeds it to ``tl.dot``; W never exists in memory.

``bitplane_linear`` picks: Triton on CUDA; on CPU the LUT up to
``LUT_MAX_TOKENS`` tokens, decode-and-matmul above (where one decode is shared
by many tokens; the crossover was measured by ``benchmarks/bench_shift_add.py``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernel is optional: CPU paths need only torch
    triton = None

from ..core.bitpack import from_planes, to_planes, unpack_bits

LUT_MAX_TOKENS = 16
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
    weight = offset.to(dtype)[:, :, None].expand(out_features, groups, group_size).clone()
    for plane, c in zip(planes, coef.to(dtype)):
        bits = unpack_bits(plane.T, groups * group_size).view(out_features, groups, group_size)
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


def bitplane_linear(x, planes, coef, offset, group_size, bias=None):
    """The forward of a bit-plane layer on any device."""
    if x.is_cuda and triton is not None:
        return bitplane_triton(x, planes, coef, offset, group_size, bias)
    if x.numel() // x.shape[-1] <= LUT_MAX_TOKENS:
        return bitplane_lut(x, planes, coef, offset, group_size, bias)
    return bitplane_reference(x, planes, coef, offset, group_size, bias)


if triton is not None:

    @triton.jit
    def _bitplane_kernel(x_ptr, planes_ptr, coef_ptr, offset_ptr, bias_ptr, y_ptr,
                         tokens, out_features, in_features, groups, nbytes,
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
            g = k0 // GROUP
            w = tl.zeros((BLOCK_O, BLOCK_K), dtype=tl.float32)
            shift = (cols % 8).to(tl.uint8)
            for i in tl.static_range(BITS):
                byte = tl.load(planes_ptr + (i * nbytes + cols[None, :] // 8) * out_features + ro[:, None],
                               mask=o_ok[:, None], other=0)
                c = tl.load(coef_ptr + (i * out_features + ro) * groups + g, mask=o_ok, other=0.0)
                w += ((byte >> shift[None, :]) & 1).to(tl.float32) * c.to(tl.float32)[:, None]
            w += tl.load(offset_ptr + ro * groups + g, mask=o_ok, other=0.0).to(tl.float32)[:, None]
            acc += tl.dot(x.to(tl.float32), tl.trans(w))
        if HAS_BIAS:
            acc += tl.load(bias_ptr + ro, mask=o_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rt[:, None] * out_features + ro[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=t_ok[:, None] & o_ok[None, :])


def bitplane_triton(x, planes, coef, offset, group_size, bias=None):
    """The Triton kernel (CUDA; on CPU only under ``TRITON_INTERPRET=1``)."""
    if triton is None:
        raise RuntimeError("bitplane_triton needs triton: pip install 'reparam[kernels]'")
    out_features, groups = offset.shape
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    tokens = x2.shape[0]
    y = torch.empty(tokens, out_features, device=x.device, dtype=x.dtype)
    block_k = 32  # group sizes are multiples of 32
    grid = (triton.cdiv(tokens, 16), triton.cdiv(out_features, 32))
    _bitplane_kernel[grid](x2, planes.contiguous(), coef.contiguous(), offset.contiguous(),
                           bias if bias is not None else offset, y,
                           tokens, out_features, shape[-1], groups, planes.shape[1],
                           BITS=planes.shape[0], GROUP=group_size, HAS_BIAS=bias is not None,
                           BLOCK_T=16, BLOCK_O=32, BLOCK_K=block_k)
    return y.view(*shape[:-1], out_features)
