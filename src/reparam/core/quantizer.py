"""The ``Quantizer`` base: group-wise scalar quantization of a weight matrix.

Every row of W (out, in) is split into groups of ``group_size`` columns;
each (row, group) has a small codebook of 2^bits levels set by a few
parameters, and every weight is replaced by the index of a level. Subclasses
say only how a group's parameters are fitted and how the levels follow from
them, as a linear form in the code's bits:

    level(c) = Σ_i coef_i · bit_i(c) + offset

That one form covers binary coding (coef_i = 2α_i, offset = −Σα_i) and
affine quantization (coef_i = 2^i·scale, offset = −zero·scale), so both share
the fitting loops here, the bit-plane storage and the forward kernels.

Two fits, shared by all quantizers:

- round-to-nearest: each group fitted to W, each weight to its nearest level;
- compensated (GPTQ, ``core.compensation``): columns quantized one by one,
  each column's error pushed onto the columns not yet quantized, which
  minimizes the output error ‖(W − Ŵ)X‖ rather than the weight error. In
  column order, a group's parameters are fitted when the loop reaches it,
  to the already-compensated weights; in activation order a group's columns
  are scattered through the loop, so all groups are fitted up front to the
  original weights (GPTQ's static groups).
"""
from __future__ import annotations

import abc
import math

import torch
from torch import nn

from .compensation import BLOCK, Compensation

# Parameters are stored in fp16; fits round them on the spot so that error
# compensation sees the levels that inference will use.
PARAM_DTYPE = torch.float16
# Batch rows fitted at once: bounds the fit's memory to a few dozen (chunk, group_size)
# float64 tensors (~30 MiB at group size 64); at 1 << 16 a 576x1536 layer's
# fit peaked 140 MiB above its start, for no gain in speed.
FIT_CHUNK = 1 << 12


class Quantizer(abc.ABC):
    """Group-wise quantizer with ``2^bits`` levels per (row, group)."""

    params_per_group: int  # P: parameters stored per (row, group)

    def __init__(self, bits: int, group_size: int):
        self.bits = bits
        self.group_size = group_size

    @abc.abstractmethod
    def fit_group(self, weight: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
        """Parameters (n, P) of n float64 groups at once, one per row of ``weight`` (n, columns).

        ``importance`` (n, columns), when given, weighs each weight's error
        (the Hessian's diagonal in the compensated fit)."""

    @abc.abstractmethod
    def linear_form(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(coef (bits, ...), offset (...)) of params (..., P): level(c) = Σ_i coef_i·bit_i(c) + offset."""

    def round_params(self, params: torch.Tensor) -> torch.Tensor:
        """Params as the quantizer's format allows them (before the fp16 cast); by default any value."""
        return params

    def encode(self, params: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Code of the level nearest to each weight (n, columns), given params (n, P) (one group per row)."""
        return nearest(self.levels(params), weight)

    def levels(self, params: torch.Tensor) -> torch.Tensor:
        """(..., 2^bits) value of every code."""
        coef, offset = self.linear_form(params)
        codes = torch.arange(2 ** self.bits, device=params.device)
        bits = ((codes[:, None] >> torch.arange(self.bits, device=params.device)) & 1).to(params.dtype)
        return torch.einsum("i...,ci->...c", coef, bits) + offset[..., None]

    def num_groups(self, columns: int) -> int:
        return math.ceil(columns / self.group_size)

    def quantize(self, weight: torch.Tensor, gram: torch.Tensor | None = None, *,
                 act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes (out, in) int64 and fp16-exact params (out, groups, P) of a float64 weight.

        With ``gram`` (Σ xxᵀ of the calibration inputs) the compensated fit,
        in activation order if ``act_order``, else round-to-nearest.
        """
        if gram is None:
            return self._round_to_nearest(weight)
        return self._compensated(weight, gram, act_order)

    def dequantize(self, codes: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """The (out, in) weight that codes and params represent, in params' dtype (differentiable in params)."""
        rows, columns = codes.shape
        levels = self.levels(params)  # (out, groups, 2^bits)
        padded = nn.functional.pad(codes, (0, levels.shape[1] * self.group_size - columns))
        return levels.gather(-1, padded.view(rows, levels.shape[1], -1)).flatten(1)[:, :columns]

    def fit_all(self, weight: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        """Fp16-exact params (rows, groups, P) of every group of a float64 weight (rows, in), fitted together.

        ``importance`` (in,) weighs each column's error. Groups are fitted as
        one batch of (rows·groups, group_size) rows (a narrower last group in
        a batch of its own), ``FIT_CHUNK`` batch rows at a time to bound memory.
        """
        rows, columns = weight.shape
        whole = columns - columns % self.group_size
        parts = []
        for span in (slice(0, whole), slice(whole, columns)):
            width = min(self.group_size, span.stop - span.start)
            if width == 0:
                continue
            groups = weight[:, span].reshape(-1, width)  # (rows·n, width): row r's n groups are adjacent
            scale = None if importance is None else importance[span].view(-1, width).repeat(rows, 1)
            params = torch.cat([self.fit_group(groups[i:i + FIT_CHUNK], None if scale is None else scale[i:i + FIT_CHUNK])
                                for i in range(0, groups.shape[0], FIT_CHUNK)])
            parts.append(params.view(rows, -1, self.params_per_group))
        return torch.cat(parts, 1).to(PARAM_DTYPE).to(weight.dtype)

    def encode_all(self, params: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Codes (rows, in) int64 of a weight, given every group's params (rows, groups, P)."""
        rows, columns = weight.shape
        padded = nn.functional.pad(weight, (0, params.shape[1] * self.group_size - columns))
        codes = self.encode(params.reshape(-1, self.params_per_group), padded.reshape(-1, self.group_size))
        return codes.view(rows, -1)[:, :columns]

    def _round_to_nearest(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        params = self.fit_all(weight)
        return self.encode_all(params, weight), params

    def _compensated(self, weight: torch.Tensor, gram: torch.Tensor,
                     act_order: bool) -> tuple[torch.Tensor, torch.Tensor]:
        compensation = Compensation(gram, act_order=act_order)
        importance = compensation.importance
        codes = torch.empty(weight.shape, dtype=torch.int64)
        params: dict[int, torch.Tensor] = {}  # group → its parameters (rows, P)
        tables: dict[int, tuple[torch.Tensor, ...]] = {}  # group → its levels in ascending order (see ``ascending``)
        if act_order:  # a group's columns are scattered through the loop: fit all groups up front (static groups)
            params = dict(enumerate(self.fit_all(weight, importance).unbind(1)))

        def approximate(col: int, pending: torch.Tensor) -> torch.Tensor:
            group = col // self.group_size
            if group not in params:  # column order: fit the group to its already-compensated columns
                width = min(self.group_size, pending.shape[1])
                params[group] = self.fit_all(pending[:, :width], importance[col:col + width])[:, 0]
            if group not in tables:
                tables[group] = ascending(self.levels(params[group]))
            ordered, order, midpoints = tables[group]
            position = torch.searchsorted(midpoints, pending[:, :1].contiguous())  # (rows, 1)
            codes[:, col] = order.gather(1, position)[:, 0]
            return ordered.gather(1, position)[:, 0]

        compensation.run(weight, approximate, block=self.group_size * math.ceil(BLOCK / self.group_size))
        params = torch.stack([params[group] for group in sorted(params)], 1)
        return codes, self.refit_to_codes(weight, gram, codes, params)

    def refit_to_codes(self, weight: torch.Tensor, gram: torch.Tensor, codes: torch.Tensor,
                       params: torch.Tensor) -> torch.Tensor:
        """Parameters refitted to the codes the compensated fit chose, for the output error on ``gram``.

        The parameters were fitted before the codes (to the weights as they then were); a quantizer whose
        levels are linear in its parameters can solve them again given the final codes. By default they stay.
        """
        return params


def ascending(levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Levels (n, L) sorted: (values (n, L), their codes (n, L), midpoints between neighbours (n, L − 1))."""
    ordered, order = levels.sort(-1)
    return ordered, order, (ordered[:, 1:] + ordered[:, :-1]) / 2


def nearest(levels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Index of the level (n, L) nearest to each weight (n, columns).

    A binary search among the midpoints of the sorted levels: O(log L) per
    weight and no (n, columns, L) intermediate."""
    _, order, midpoints = ascending(levels)
    return order.gather(1, torch.searchsorted(midpoints, weight.contiguous()))
