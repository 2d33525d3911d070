"""Column-by-column error compensation (GPTQ, Frantar et al. 2023), for any
per-column approximation: quantization codes, sparse codes.

Columns of W are approximated left to right; each column's error is pushed
onto the columns not yet approximated through the inverse Hessian of the
calibration inputs, H = Σ xxᵀ, so the loop minimizes the output error
‖(W − Ŵ)X‖ rather than the weight error.

With ``act_order`` (GPTQ's activation order) the columns are taken in
decreasing order of H_jj instead: the columns whose errors cost most are
approximated first, while the most columns remain to absorb their error.
"""
from __future__ import annotations

from typing import Callable

import torch

DAMP = 0.01  # GPTQ's dampening: 1% of the mean diagonal of H
BLOCK = 128  # columns per lazy-update block (GPTQ's choice)
# Columns per step inside a block: a column's error is pushed at once only onto
# the rest of its step, and a step's errors onto the rest of the block by one
# matrix product, so the per-column work is O(rows·STEP), not O(rows·BLOCK).
STEP = 16

# approximate(column index, pending) → the approximated column (rows,), where
# pending (rows, n) holds the compensated columns in processing order, from
# that column to the end of its step, or, at a step's first column, to the end
# of its block, so a group's parameters can be fitted when the loop reaches the
# group (groups start at step starts). The column index is the weight's own,
# in any order.
Approximate = Callable[[int, torch.Tensor], torch.Tensor]


class Compensation:
    """The factored inverse Hessian of one layer's calibration inputs."""

    def __init__(self, gram: torch.Tensor, *, act_order: bool = False):
        hessian = gram.to(torch.float64)
        # The processing order; everything below is kept in it.
        self.order = (torch.argsort(hessian.diagonal(), descending=True, stable=True) if act_order
                      else torch.arange(hessian.shape[0]))
        hessian = hessian[self.order][:, self.order] if act_order else hessian.clone()  # gram is left as it was
        self.dead = hessian.diagonal() == 0  # channels never active: any value is free
        hessian[self.dead, self.dead] = 1
        hessian.diagonal().add_(DAMP * hessian.diagonal().mean())
        # Upper Cholesky factor of H⁻¹: row j holds the update that column j's
        # error spreads over the columns after it (GPTQ's Cholesky form). Each
        # (in, in) step frees the one before it: at most two are alive at once.
        lower = torch.linalg.cholesky(hessian)
        del hessian
        inverse = torch.cholesky_inverse(lower)
        del lower
        self.update = torch.linalg.cholesky(inverse, upper=True)

    @property
    def importance(self) -> torch.Tensor:
        """(in,) 1/[H⁻¹]_jj: what an error in column j costs in output error, after compensation."""
        importance = torch.empty_like(self.update.diagonal())
        importance[self.order] = self.update.diagonal().square().reciprocal()
        return importance

    def run(self, weight: torch.Tensor, approximate: Approximate, *, block: int = BLOCK) -> None:
        """Call ``approximate`` on every column of a float64 weight, in processing order, with compensation.

        A group the callback fits at once should start at a step start (group sizes multiples of ``STEP``).
        """
        weight = weight[:, self.order]  # a copy
        weight[:, self.dead] = 0
        update = self.update
        order, pivots = self.order.tolist(), update.diagonal().tolist()
        columns = weight.shape[1]
        for start in range(0, columns, block):
            end = min(start + block, columns)
            work = weight[:, start:end].clone()  # (rows, block), positions relative to start
            errors = torch.zeros_like(work)
            for step in range(0, end - start, STEP):
                stop = min(step + STEP, end - start)
                for i in range(step, stop):
                    col = start + i
                    pending = work[:, i:] if i == step else work[:, i:stop]
                    error = (work[:, i] - approximate(order[col], pending)) / pivots[col]
                    work[:, i:stop].addr_(error, update[col, col:start + stop], alpha=-1)
                    errors[:, i] = error
                work[:, stop:] -= errors[:, step:stop] @ update[start + step:start + stop, start + stop:end]
            weight[:, end:] -= errors @ update[start:end, end:]
