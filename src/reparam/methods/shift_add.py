"""Shift-add: multiplication-free binary-coded quantization (ShiftAddLLM,
You et al., NeurIPS 2024).

Each (row, group of ``group_size`` columns) is W ≈ Σ_{i<q} α_i·B_i with
bit-planes B_i ∈ {−1, +1} and scales α_i. With ``scale="pow2"`` every α is a
sum of ``pow2_terms`` signed powers of two, so activation × scale is shifts
and adds, and B_i × activations are table lookups and adds (LUT-GEMM).

The group fit: a greedy start (B_i = sign(r), α_i = mean|r| of the residual
r), then alternating rounds of α by least squares given B and the best code
for every weight given α. Under the compensated (GPTQ) fit, inherited from
the ``Quantizer`` base, the least squares weigh each column by the Hessian's
diagonal, and the codes are re-chosen column by column as errors are pushed
forward: ShiftAddLLM's output-error objective.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from ..core.config import ConfigError, check_choice
from ..core.linalg import ridged_solve
from ..core.quantized import QuantizedConfig, QuantizedLinear
from ..core.quantizer import PARAM_DTYPE, Quantizer
from ..core.registry import register_wrapper

ALS_ROUNDS = 15  # alternating rounds; at 4 bits fidelity stops improving after about 15
# The size-budget allocator's cheap scores (``cheap``): the candidates it refits for real are chosen from these.
CHEAP_ALS_ROUNDS = 3
REFIT_ROWS = 8  # rows whose scales are refitted at once: bounds the (rows, in, groups·bits) float64 temporaries
FP16_SPAN = 10  # fp16 holds 11 significant bits: terms more than 10 octaves below the first are dropped


@dataclasses.dataclass(frozen=True)
class ShiftAddConfig(QuantizedConfig):
    """``bits`` 2, 3, 4 or "auto" (with ``target_bits``); ``scale`` "pow2" or "float"."""

    method: ClassVar[str] = "shift_add"
    FIELD_DOCS: ClassVar[dict[str, str]] = {
        "scale": '"pow2": each scale a sum of pow2_terms signed powers of two (multiplication-free); "float"',
        "pow2_terms": "powers of two per scale, 1 to 4 (ShiftAddLLM's code uses 3)",
        "als_rounds": "alternating least-squares rounds per group (fewer: faster, coarser)",
    }
    BITS: ClassVar[tuple[int, ...]] = (2, 3, 4)
    bits: int | str = 3
    scale: str = "pow2"
    pow2_terms: int = 3  # ShiftAddLLM's reference code uses 3
    als_rounds: int = ALS_ROUNDS
    ROW_FIT_COST: ClassVar[float] = 16000  # alternating least squares per group: ~3.5x affine's per-row time

    def __post_init__(self):
        super().__post_init__()
        check_choice(self.method, "scale", self.scale, ("pow2", "float"))
        if not isinstance(self.pow2_terms, int) or not 1 <= self.pow2_terms <= 4:
            raise ConfigError(f"{self.method}: pow2_terms={self.pow2_terms!r} must be an integer in [1, 4]")
        if isinstance(self.als_rounds, bool) or not isinstance(self.als_rounds, int) or self.als_rounds < 0:
            raise ConfigError(f"{self.method}: als_rounds={self.als_rounds!r} must be a non-negative integer")

    def cheap(self) -> "ShiftAddConfig":
        # Round-to-nearest and a few alternating rounds. On SmolLM2 the cheap scores' 15-round fits were a third
        # of `auto`'s time; the options near each layer's choice are refitted in full (core.budget).
        return super().cheap().replace(als_rounds=CHEAP_ALS_ROUNDS)

    def quantizer(self, bits: int | None = None) -> Quantizer:
        return BinaryCoding(bits or self.bits, self.group_size,
                            pow2_terms=self.pow2_terms if self.scale == "pow2" else None, rounds=self.als_rounds)


class BinaryCoding(Quantizer):
    """W ≈ Σ_i α_i·B_i per (row, group); params are the α_i, P = bits."""

    def __init__(self, bits: int, group_size: int, pow2_terms: int | None, rounds: int = ALS_ROUNDS):
        super().__init__(bits, group_size)
        self.params_per_group = bits
        self.pow2_terms, self.rounds = pow2_terms, rounds

    def fit_group(self, weight: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
        # Alternating least squares from two starts, keeping the better per
        # row: the greedy residual start suits peaked groups, an evenly spaced
        # grid (α_i = 2^i·δ) suits flat ones; at 4 bits the grid wins often.
        importance = torch.ones_like(weight) if importance is None else importance
        # Nearest-level codes are monotone in w, so with each row's weights
        # sorted, the weights that take one level are a run, and what a round's
        # least squares need of them (Σ importance·w^k, k = 0, 1, 2, per level)
        # are differences of prefix sums at the runs' ends: a round costs
        # O(2^q · log columns) per row, not O(columns).
        ordered, order = weight.sort(1)
        weighted = importance.gather(1, order)
        prefix = nn.functional.pad(torch.stack([weighted, weighted * ordered, weighted * ordered.square()]).cumsum(-1),
                                   (1, 0))  # (3, n, columns + 1)
        greedy = self._solve(*self._sums_of_codes(self._greedy_codes(weight), weight, importance))
        grid = self._solve(*self._sums_of_runs(self._grid_alpha(weight), ordered, prefix)[:2])
        best_alpha, best_error = None, None
        for alpha in (greedy, grid):
            for _ in range(self.rounds):
                alpha = self._solve(*self._sums_of_runs(alpha, ordered, prefix)[:2])
            error = self._error(alpha, *self._sums_of_runs(alpha, ordered, prefix))
            if best_alpha is None:
                best_alpha, best_error = alpha, error
            else:
                better = error < best_error
                best_alpha = torch.where(better[:, None], alpha, best_alpha)
                best_error = torch.minimum(error, best_error)
        return self.round_params(best_alpha)

    def round_params(self, alpha: torch.Tensor) -> torch.Tensor:
        """α as sums of powers of two when the scales are (``pow2_terms``), else as they are."""
        return pow2_round(alpha, self.pow2_terms) if self.pow2_terms else alpha

    def refit_to_codes(self, weight, gram, codes, params):
        """Every row's α, all groups together, by least squares on the output error given the codes.

        With signs s_i = 2·bit_i − 1, row r's weight is Ŵ_r = B_r·α_r, B_r (in, groups·bits) holding s_i on
        group g's columns in column (g, i), so ‖(W − Ŵ)_r X‖² = (w_r − B_r α_r)ᵀ H (w_r − B_r α_r) is least
        at (B_rᵀ H B_r) α_r = B_rᵀ H w_r. The new α are rounded as stored (powers of two, fp16) and kept for
        the rows whose output error they lower.
        """
        rows, columns = weight.shape
        groups, size = params.shape[1], self.group_size
        padding = groups * size - columns
        hessian = nn.functional.pad(gram.to(weight.dtype), (0, padding, 0, padding)).view(-1, groups, size)
        weight, codes = nn.functional.pad(weight, (0, padding)), nn.functional.pad(codes, (0, padding))
        code_signs = _code_signs(self.bits, weight.dtype)
        refitted = params.clone()
        for first in range(0, rows, REFIT_ROWS):
            part = slice(first, min(first + REFIT_ROWS, rows))
            basis = code_signs[codes[part]].view(-1, groups, size, self.bits)  # B_r as (groups, size, bits) blocks
            h_basis = torch.einsum("jgk,rgki->rjgi", hessian, basis).reshape(-1, groups, size, groups * self.bits)
            normal = torch.einsum("rgki,rgkm->rgim", basis, h_basis).reshape(-1, groups * self.bits,
                                                                             groups * self.bits)
            h_weight = weight[part] @ hessian.view(groups * size, -1)  # (n, in): H w_r
            target = torch.einsum("rgki,rgk->rgi", basis, h_weight.view(-1, groups, size)).reshape(len(normal), -1)
            alpha = self.round_params(ridged_solve(normal, target)).to(PARAM_DTYPE).to(weight.dtype)
            old = params[part].reshape(len(normal), -1)
            better = _quadratic(alpha, normal, target) < _quadratic(old, normal, target)
            refitted[part] = torch.where(better[:, None], alpha, old).view(-1, groups, self.bits)
        return refitted

    def _greedy_codes(self, weight: torch.Tensor) -> torch.Tensor:
        """Codes whose bit i is the sign of the residual left by planes 0..i−1,
        their scales refitted by (unweighted) least squares after each plane (a
        plain mean|r| can leave a residual whose sign repeats an earlier plane,
        and the fit then never separates them)."""
        codes = torch.zeros(weight.shape, dtype=torch.int64)
        residual, ones = weight, torch.ones_like(weight)
        for i in range(self.bits):
            codes |= (residual >= 0).to(torch.int64) << i
            alpha = self._solve(*self._sums_of_codes(codes, weight, ones, 2 ** (i + 1)))
            residual = weight - (alpha @ _code_signs(i + 1, weight.dtype).T).gather(1, codes)
        return codes

    def _grid_alpha(self, weight: torch.Tensor) -> torch.Tensor:
        """α_i = 2^i·δ: levels ±δ, ±3δ, …, ±(2^q − 1)δ, the outermost at the group's max |w|."""
        step = weight.abs().amax(1, keepdim=True) / (2 ** self.bits - 1)
        return step * 2.0 ** torch.arange(self.bits, dtype=weight.dtype)

    def _sums_of_codes(self, codes, weight, importance, count=None):
        """(Σ importance, Σ importance·w) (n, count) over the weights of each code."""
        count = count or 2 ** self.bits
        sums = torch.zeros(2, weight.shape[0], count, dtype=weight.dtype)
        sums[0].scatter_add_(1, codes, importance)
        sums[1].scatter_add_(1, codes, importance * weight)
        return sums[0], sums[1]

    def _sums_of_runs(self, alpha, ordered, prefix):
        """(Σ importance·w^k for k = 0, 1, 2) (n, 2^q) over the weights nearest each level of α (n, q)."""
        levels, order = (alpha @ _code_signs(self.bits, alpha.dtype).T).sort(-1)  # (n, 2^q) ascending
        ends = torch.searchsorted(ordered, (levels[:, 1:] + levels[:, :-1]) / 2)  # (n, 2^q − 1) weights below each midpoint
        ends = nn.functional.pad(ends, (1, 0), value=0)
        ends = nn.functional.pad(ends, (0, 1), value=ordered.shape[1])  # (n, 2^q + 1) run boundaries
        at = prefix.gather(2, ends.expand(3, -1, -1))
        runs = at[..., 1:] - at[..., :-1]  # (3, n, 2^q) per level, ascending
        return tuple(torch.empty_like(runs).scatter_(2, order.expand(3, -1, -1), runs))  # per code

    def _error(self, alpha, count, first, second):
        """Σ importance·(w − level)² from each code's sums."""
        levels = alpha @ _code_signs(self.bits, alpha.dtype).T
        return (second - 2 * levels * first + levels.square() * count).sum(1)

    @staticmethod
    def _solve(count, first):
        """α (n, q) by least squares given each code's (Σ importance, Σ importance·w) (n, 2^q)."""
        signs = _code_signs(count.shape[1].bit_length() - 1, count.dtype)  # (2^q, q)
        outer = (signs[:, :, None] * signs[:, None, :]).flatten(1)  # (2^q, q·q)
        gram = (count @ outer).view(-1, signs.shape[1], signs.shape[1])  # Σ importance·b bᵀ, (n, q, q)
        return ridged_solve(gram, first @ signs)

    def linear_form(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Σ α_i·(2·bit_i − 1) = Σ 2α_i·bit_i − Σ α_i
        return 2 * params.movedim(-1, 0), -params.sum(-1)


def _quadratic(x: torch.Tensor, normal: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(n,) xᵀ·normal·x − 2·xᵀ·target per row: a least-squares error up to its constant."""
    return (x * (normal @ x[:, :, None])[..., 0]).sum(1) - 2 * (x * target).sum(1)


def _code_signs(bits: int, dtype: torch.dtype) -> torch.Tensor:
    """(2^bits, bits): ±1 value of every bit of every code."""
    codes = torch.arange(2 ** bits)[:, None] >> torch.arange(bits)
    return ((codes & 1) * 2 - 1).to(dtype)


def pow2_round(values: torch.Tensor, terms: int) -> torch.Tensor:
    """Each value as a sum of ``terms`` signed powers of two, found greedily
    from the residual (nearest power of two in linear terms at each step).

    Terms more than ``FP16_SPAN`` octaves below the first are dropped, so the
    result is exact in fp16, as stored.
    """
    result = torch.zeros_like(values)
    residual = values.clone()
    lead = None
    for _ in range(terms):
        magnitude = residual.abs()
        exponent = torch.floor(torch.log2(magnitude.clamp_min(2.0 ** -24)))
        exponent += (magnitude > 1.5 * torch.exp2(exponent)).to(exponent.dtype)
        lead = exponent if lead is None else lead
        keep = (magnitude > 0) & (exponent >= lead - FP16_SPAN) & (exponent >= -24)
        term = torch.where(keep, torch.sign(residual) * torch.exp2(exponent), 0.0)
        result += term
        residual -= term
    return result


@register_wrapper(ShiftAddConfig)
class ShiftAddLinear(QuantizedLinear):
    """``nn.Linear`` with W = Σ α_i·B_i per group: ``bits`` packed ±1 planes and fp16 α."""
