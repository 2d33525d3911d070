"""dense_sparse's whitened code step: every column's sparse code, in GPTQ's
compensated order.

Given a column's projection y = Dᵀw (k,), its support is the ``nnz`` atoms
of largest |C·y| (C: each atom's contribution in the dense code), its values
solve the system (DᵀD plus a tiny ridge) restricted to the support, and its
approximation in the projected space is DᵀD·s. The columns are coded one
after another, each one's error compensated onto those not yet coded
(``core.compensation``).

- ``sparse_code_column_reference``: one column's code, the definition.
- ``compensated_codes``: every column, by the compiled op
  (``csrc/sparse_code.cpp``: the whole loop in one call) where it builds and
  the coder has no pattern, else by ``Compensation.run`` calling the coder's
  ``column`` in Python. In torch, a dozen small ops per column were most of
  the fit's time (docs/kernels.md, "Fitting: dense_sparse's column codes").
"""
from __future__ import annotations

import torch

from ..core.compensation import BLOCK, STEP, Compensation
from .extension import compiled_ops


def sparse_code_column_reference(y, contribution, system, gram, nnz):
    """(values (nnz,), indices (nnz,) ascending int64, DᵀD·s (k,)) of one column; float64 in and out."""
    support = (contribution @ y).abs().topk(nnz).indices.sort().values
    values = torch.linalg.solve(system.index_select(0, support).index_select(1, support), y[support])
    return values, support, values @ gram.index_select(0, support)  # DᵀD symmetric: its rows for its columns


def compensated_codes(projected: torch.Tensor, compensation: Compensation, coder) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (s, in), indices (s, in) int64) of every column of ``projected`` (k, in), float64.

    ``coder`` has ``nnz``, ``pattern``, ``contribution``, ``system``, ``gram``
    (float64 (k, k)) and ``column(y) -> (values, indices, DᵀD·s)``.
    """
    ops = compiled_ops() if coder.pattern is None else None
    if ops is not None:
        return ops.sparse_codes_compensated(projected.contiguous(), compensation.update.contiguous(),
                                            compensation.order, compensation.dead, coder.contribution.T.contiguous(),
                                            coder.system, coder.gram, coder.nnz, BLOCK, STEP)
    values = projected.new_empty(coder.nnz, projected.shape[1])
    indices = torch.empty(coder.nnz, projected.shape[1], dtype=torch.int64)

    def approximate(col: int, pending: torch.Tensor) -> torch.Tensor:
        values[:, col], indices[:, col], approximation = coder.column(pending[:, 0])
        return approximation

    compensation.run(projected, approximate)
    return values, indices
