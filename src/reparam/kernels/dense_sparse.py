"""y = x·(D·S)ᵀ + b for S (k, in) stored column-sparse: ``values`` and
``indices`` (s, in), the s atoms each input channel feeds.

- ``dense_sparse_reference``: build W = D·S, one matmul. The definition.
- CPU (``dense_sparse_cpu``): z = x·Sᵀ, then y = z·Dᵀ, never the full W.
  Up to ``SCATTER_MAX_TOKENS`` tokens z is a scatter-add of the s·in
  products x_j·S[a, j] into their atoms — by the compiled kernel
  (``csrc/dense_sparse.cpp``, a reused buffer for z) when it builds, else by
  torch's ``index_add_``; above, S is scattered into a dense (k, in) matrix
  once and z is a matmul (crossovers measured by
  ``benchmarks/bench_kernels.py``).
- CUDA (``dense_sparse_triton``): each program builds a (k, BLOCK_IN) tile
  of S in registers from the stored pairs and accumulates x·Sᵀ with
  ``tl.dot``; S never exists in memory. Then y = z·Dᵀ by cuBLAS: the dense
  product is already optimal there, the fusion that matters is the sparse one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .extension import cpu_kernels_for

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernel is optional: CPU paths need only torch
    triton = None


def sparse_to_dense(values: torch.Tensor, indices: torch.Tensor, atoms: int) -> torch.Tensor:
    """(k, in) matrix with values[r, j] at row indices[r, j] of column j."""
    dense = values.new_zeros(atoms, values.shape[1])
    return dense.scatter(0, indices.long(), values)


SCATTER_MAX_TOKENS = 2
COMPILED_SCATTER_MAX_TOKENS = 8


def dense_sparse_reference(x, d, values, indices, bias=None):
    return F.linear(x, d @ sparse_to_dense(values, indices, d.shape[1]), bias)


def dense_sparse_cpu(x, d, values, indices, bias=None):
    atoms = d.shape[1]
    tokens = x.numel() // x.shape[-1]
    compiled = cpu_kernels_for(x)
    if compiled is not None and tokens <= COMPILED_SCATTER_MAX_TOKENS:
        return compiled.dense_sparse_linear(x, d, values, indices, bias)
    if tokens > SCATTER_MAX_TOKENS:
        return F.linear(F.linear(x, sparse_to_dense(values, indices, atoms)), d, bias)
    rows = x.reshape(-1, x.shape[-1])
    products = (values * rows[:, None, :]).reshape(rows.shape[0], -1)  # (tokens, s·in)
    codes = rows.new_zeros(rows.shape[0], atoms).index_add_(1, indices.long().flatten(), products)
    return F.linear(codes, d, bias).view(*x.shape[:-1], d.shape[0])


def register_compiled_ops() -> None:
    """Shape-only and backward formulas for ``reparam_cpu::dense_sparse_linear``."""
    name = "reparam_cpu::dense_sparse_linear"

    @torch.library.register_fake(name)
    def _(x, d, values, indices, bias):
        return d.new_empty(*x.shape[:-1], d.shape[0])

    def setup_context(ctx, inputs, output):
        x, d, values, indices, bias = inputs
        ctx.save_for_backward(x, d, values, indices)
        ctx.has_bias = bias is not None

    def backward(ctx, grad):
        x, d, values, indices = ctx.saved_tensors
        with torch.enable_grad():  # the torch forward's own graph gives every input's gradient
            inputs = [t.detach().requires_grad_(t.is_floating_point()) for t in (x, d, values)]
            bias = grad.new_zeros(d.shape[0], requires_grad=True) if ctx.has_bias else None
            y = dense_sparse_reference(*inputs, indices, bias)
            wanted = inputs + ([bias] if bias is not None else [])
            grads = torch.autograd.grad(y, wanted, grad)
        grad_x, grad_d, grad_values = grads[:3]
        return grad_x, grad_d, grad_values, None, grads[3] if ctx.has_bias else None

    torch.library.register_autograd(name, backward, setup_context=setup_context)


def dense_sparse_linear(x, d, values, indices, bias=None):
    """The compressed forward on any device."""
    if x.is_cuda and triton is not None:
        return F.linear(sparse_codes_triton(x, values, indices, d.shape[1]), d, bias)
    return dense_sparse_cpu(x, d, values, indices, bias)


if triton is not None:

    @triton.jit
    def _sparse_codes_kernel(x_ptr, values_ptr, indices_ptr, z_ptr, tokens, in_features, atoms, nnz,
                             BLOCK_T: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_IN: tl.constexpr):
        # z[t, a] = Σ_j S[a, j]·x[t, j] for one (BLOCK_T, BLOCK_A) tile.
        rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        ra = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
        rj = tl.arange(0, BLOCK_IN)
        acc = tl.zeros((BLOCK_T, BLOCK_A), dtype=tl.float32)
        for j0 in range(0, in_features, BLOCK_IN):
            cols = j0 + rj
            j_ok = cols < in_features
            x = tl.load(x_ptr + rt[:, None] * in_features + cols[None, :],
                        mask=(rt < tokens)[:, None] & j_ok[None, :], other=0.0)
            s = tl.zeros((BLOCK_A, BLOCK_IN), dtype=tl.float32)
            for r in range(nnz):
                atom = tl.load(indices_ptr + r * in_features + cols, mask=j_ok, other=0).to(tl.int32)
                value = tl.load(values_ptr + r * in_features + cols, mask=j_ok, other=0.0).to(tl.float32)
                s += tl.where(atom[None, :] == ra[:, None], value[None, :], 0.0)
            acc += tl.dot(x.to(tl.float32), tl.trans(s))
        tl.store(z_ptr + rt[:, None] * atoms + ra[None, :], acc.to(z_ptr.dtype.element_ty),
                 mask=(rt < tokens)[:, None] & (ra < atoms)[None, :])


def sparse_codes_triton(x, values, indices, atoms):
    """z = x·Sᵀ, (…, k), by the Triton kernel (CUDA; on CPU only under ``TRITON_INTERPRET=1``)."""
    if triton is None:
        raise RuntimeError("sparse_codes_triton needs triton: pip install 'reparam[kernels]'")
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    z = torch.empty(x2.shape[0], atoms, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(x2.shape[0], 16), triton.cdiv(atoms, 32))
    _sparse_codes_kernel[grid](x2, values.contiguous(), indices.contiguous(), z, x2.shape[0], shape[-1], atoms,
                               values.shape[0], BLOCK_T=16, BLOCK_A=32, BLOCK_IN=32)
    return z.view(*shape[:-1], atoms)
