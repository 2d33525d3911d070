"""Quantization with a low-rank repair (QERA, Zhang et al. 2024, arXiv 2410.06040):
W ≈ Q + L·R.

W is quantized to Q by any quantization method (``base``, e.g. affine 3-bit
with GPTQ); then the rank-k term minimizing the output error of what is
left, ‖(W − Q − L·R)X‖_F, is found in closed form: with the calibration Gram
G = Σ xᵀx = S·Sᵀ, the truncated SVD of (W − Q)·S gives L·R = U_k Σ_k V_kᵀ S⁻¹
(the SVD-LLM whitening of ``low_rank``, applied to the quantization
residual; without calibration, the plain SVD of W − Q). The forward adds the
two thin products to the quantized one. L and R are stored in fp16.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.factorizer import Identity, TruncatedSVD, Whitening
from ..core.module import ReparamModule
from ..core.quantized import ComposedConfig, QuantizedLinear
from ..core.registry import register_wrapper
from ..core.stats import LayerStats

FACTOR_DTYPE = torch.float16  # L, R as stored: half the bytes of fp32, ample for a correction term


@dataclasses.dataclass(frozen=True)
class QeraConfig(ComposedConfig):
    """``base``: the quantization config of Q (a dict, e.g. ``{"method": "affine", "bits": 3}``).
    Set ``rank`` or ``rank_bits``: the bits per dense weight the fp16 factors may add."""

    method: ClassVar[str] = "qera"
    FIELD_DOCS: ClassVar[dict[str, str]] = {
        "base": 'the quantization config of Q, e.g. {"method": "affine", "bits": 3}',
        "rank": "k of the repair term L·R",
        "rank_bits": "bits per dense weight the fp16 factors may add (sets the rank)",
    }
    SIZE_FIELD: ClassVar[str] = "rank_bits"
    rank_bits: float | None = None

    def rank_for(self, in_features: int, out_features: int) -> int:
        if self.rank is not None:
            return self.rank
        bits_per_rank = 8 * FACTOR_DTYPE.itemsize * (in_features + out_features)
        rank = int(self.rank_bits * in_features * out_features // bits_per_rank)
        return max(1, min(rank, in_features, out_features))


@register_wrapper(QeraConfig)
class QeraLinear(ReparamModule):
    """``nn.Linear`` with W = Q + L·R: ``quantized`` (a bias-free ``QuantizedLinear``), ``l`` (out, k), ``r`` (k, in)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, config: QeraConfig, *,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, config, device=device, dtype=dtype)
        self.quantized = QuantizedLinear(in_features, out_features, False, config.base_config,
                                         device=device, dtype=dtype)
        self.rank = config.rank_for(in_features, out_features)
        self.l = nn.Parameter(torch.zeros(out_features, self.rank, device=device, dtype=FACTOR_DTYPE))
        self.r = nn.Parameter(torch.zeros(self.rank, in_features, device=device, dtype=FACTOR_DTYPE))

    def fit(self, weight: torch.Tensor, stats: LayerStats | None) -> None:
        self.quantized.fit(weight, stats)
        residual = weight - self.quantized.materialize().to(weight.dtype)
        space = Whitening(stats.gram) if stats is not None else Identity()
        l, r = TruncatedSVD(self.rank, space).factorize(residual, stats)
        self.l.copy_(l)
        self.r.copy_(r)

    def materialize(self) -> torch.Tensor:
        return self.quantized.materialize() + (self.l.float() @ self.r.float()).to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        repair = F.linear(F.linear(x, self.r.to(x.dtype)), self.l.to(x.dtype))
        return self.quantized(x) + repair + (self.bias if self.bias is not None else 0)
