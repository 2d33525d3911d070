"""Low-rank factors stored by a quantizer: W ≈ Û·V̂ with U (out, r) and
V (r, in) each quantized (e.g. affine 4-bit), so that at the bytes of an
fp32 low-rank layer the rank can be several times larger.

The fit reuses the parts it is made of: the whitened truncated SVD of
``low_rank`` gives U, V; V is quantized by the base quantizer's own fit on
the layer's inputs (GPTQ on the Gram G = Σ xᵀx); U is refitted to the
quantized V̂ in closed form, U = W G V̂ᵀ (V̂ G V̂ᵀ)⁻¹, the exact minimizer of
‖(W − U V̂)X‖; then U is quantized on the inputs it sees, V̂x (Gram V̂ G V̂ᵀ).
Without calibration G = I and the fits are round-to-nearest.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from ..core.config import ConfigError
from ..core.factorizer import Identity, TruncatedSVD, Whitening
from ..core.linalg import ridged_solve
from ..core.module import ReparamModule
from ..core.quantized import ComposedConfig, QuantizedLinear
from ..core.registry import register_wrapper
from ..core.stats import LayerStats

RANK_STEP = 32  # ranks are rounded down to whole quantization groups of U's inputs (no padded columns)


@dataclasses.dataclass(frozen=True)
class QuantizedLowRankConfig(ComposedConfig):
    """``base``: the quantization config of both factors (a dict, e.g.
    ``{"method": "affine", "bits": 4}``). Set ``rank`` or ``rank_ratio``
    (rank as a fraction of min(in, out), rounded down to a multiple of 32)."""

    method: ClassVar[str] = "quantized_low_rank"
    FIELD_DOCS: ClassVar[dict[str, str]] = {
        "base": 'the quantization config of both factors, e.g. {"method": "affine", "bits": 4}',
        "rank": "r of the factors",
        "rank_ratio": "r as a fraction of min(in, out), rounded down to a multiple of 32",
    }
    SIZE_FIELD: ClassVar[str] = "rank_ratio"
    rank_ratio: float | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.rank_ratio is not None and self.rank_ratio > 1:
            raise ConfigError(f"{self.method}: rank_ratio={self.rank_ratio!r} must be in (0, 1]")

    def rank_for(self, in_features: int, out_features: int) -> int:
        if self.rank is not None:
            return self.rank
        rank = int(self.rank_ratio * min(in_features, out_features))
        return max(1, rank - rank % RANK_STEP if rank >= RANK_STEP else rank)


@register_wrapper(QuantizedLowRankConfig)
class QuantizedLowRankLinear(ReparamModule):
    """``nn.Linear`` with W = Û·V̂: ``v`` (in → r) and ``u`` (r → out), each a bias-free ``QuantizedLinear``."""

    def __init__(self, in_features: int, out_features: int, bias: bool, config: QuantizedLowRankConfig, *,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, config, device=device, dtype=dtype)
        self.rank = config.rank_for(in_features, out_features)
        base = config.base_config
        self.v = QuantizedLinear(in_features, self.rank, False, base, device=device, dtype=dtype)
        self.u = QuantizedLinear(self.rank, out_features, False, base, device=device, dtype=dtype)

    def fit(self, weight: torch.Tensor, stats: LayerStats | None) -> None:
        gram = stats.gram if stats is not None else torch.eye(self.in_features, dtype=torch.float64)
        space = Whitening(gram) if stats is not None else Identity()
        _, v = TruncatedSVD(self.rank, space).factorize(weight, stats)
        self.v.fit(v, stats)
        v_hat = self.v.materialize().to(torch.float64)  # (r, in)
        inner = v_hat @ gram @ v_hat.T  # (r, r): Gram of the inputs U sees
        u = ridged_solve(inner, v_hat @ gram @ weight.T).T  # W G V̂ᵀ (V̂ G V̂ᵀ)⁻¹
        self.u.fit(u, LayerStats(gram=inner, abs_sum=torch.zeros(self.rank, dtype=torch.float64),
                                 count=stats.count if stats is not None else 0) if stats is not None else None)

    def materialize(self) -> torch.Tensor:
        return self.u.materialize() @ self.v.materialize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.u(self.v(x))
        return out + self.bias if self.bias is not None else out
