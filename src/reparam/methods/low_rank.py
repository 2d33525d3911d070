"""Low-rank factorization: W (out, in) ≈ U (out, r) · V (r, in).

Three factorizers, one algorithm: a truncated SVD of W·T in an input space
T chosen from calibration statistics, mapped back by T⁻¹.

- ``svd``: T = I; minimizes the weight error. Data-free.
- ``asvd``: T = diag(mean|x|^α) (Yuan et al. 2023); channels that carry
  large activations are kept more precisely.
- ``whitened``: T = chol(Σ xᵀx) (SVD-LLM, Wang et al. 2024); minimizes the
  layer's output error on the calibration inputs exactly.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import ConfigError, MethodConfig, check_budget, check_choice, check_range
from ..core.factorizer import ChannelScaling, Identity, InputSpace, TruncatedSVD, Whitening, rank_for_ratio
from ..core.module import ReparamModule
from ..core.registry import register_wrapper
from ..core.stats import LayerStats
from ..kernels.factor_chain import factor_chain_linear

FACTORIZERS = ("auto", "svd", "asvd", "whitened")


@dataclasses.dataclass(frozen=True)
class LowRankConfig(MethodConfig):
    """Set ``size_ratio`` or ``rank``.

    ``factorizer="auto"`` is ``whitened`` when ``convert`` gets calibration
    data and ``svd`` when it does not.
    """

    method: ClassVar[str] = "low_rank"
    FIELD_DOCS: ClassVar[dict[str, str]] = {
        "size_ratio": "fraction of the dense layer's bytes kept, bias included (sets the rank)",
        "rank": "r: U is (out, r), V is (r, in)",
        "factorizer": '"auto" (whitened with calibration data, else svd), "svd", "asvd" or "whitened"',
        "asvd_alpha": "ASVD's exponent on mean|x| (0.5, the paper's choice)",
    }
    size_ratio: float | None = None  # fraction of the dense layer's bytes kept, bias included
    rank: int | None = None
    factorizer: str = "auto"
    asvd_alpha: float = 0.5  # ASVD's exponent on mean|x|; 0.5 is the paper's choice

    def __post_init__(self):
        check_budget(self.method, self.size_ratio, {"rank": self.rank})
        check_choice(self.method, "factorizer", self.factorizer, FACTORIZERS)
        check_range(self.method, "asvd_alpha", self.asvd_alpha, 0.0, 2.0)

    def requires_calibration(self) -> bool:
        return self.factorizer in ("asvd", "whitened")

    def uses_calibration(self) -> bool:
        return self.factorizer != "svd"

    def check_layer(self, name: str, in_features: int, out_features: int) -> None:
        if self.rank is not None and self.rank > min(in_features, out_features):
            raise ConfigError(f"low_rank: rank={self.rank} exceeds min(in, out)="
                              f"{min(in_features, out_features)} of layer '{name}'; lower the rank "
                              "or use size_ratio")

    def rank_for(self, in_features: int, out_features: int, bias: bool) -> int:
        if self.rank is not None:
            return self.rank
        return rank_for_ratio(self.size_ratio, in_features, out_features, bias)


def input_space(config: LowRankConfig, stats: LayerStats | None) -> InputSpace:
    kind = config.factorizer
    if kind == "auto":
        kind = "whitened" if stats is not None else "svd"
    if kind != "svd" and stats is None:
        raise ConfigError(f"low_rank: factorizer '{kind}' needs calibration statistics; pass calib to convert")
    if kind == "asvd":
        return ChannelScaling(stats.mean_abs ** config.asvd_alpha)
    if kind == "whitened":
        return Whitening(stats.gram)
    return Identity()


@register_wrapper(LowRankConfig)
class LowRankLinear(ReparamModule):
    """``nn.Linear`` with W = U·V; the forward runs the two thin matmuls."""

    TUNABLE = ("u", "v")

    def __init__(self, in_features: int, out_features: int, bias: bool, config: LowRankConfig, *,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, config, device=device, dtype=dtype)
        self.rank = config.rank_for(in_features, out_features, bias)
        self.u = nn.Parameter(torch.empty(out_features, self.rank, device=device, dtype=self.dtype))
        self.v = nn.Parameter(torch.empty(self.rank, in_features, device=device, dtype=self.dtype))

    def fit(self, weight: torch.Tensor, stats: LayerStats | None) -> None:
        u, v = TruncatedSVD(self.rank, input_space(self.config, stats)).factorize(weight, stats)
        self.u.copy_(u)
        self.v.copy_(v)

    def materialize(self) -> torch.Tensor:
        return self.u @ self.v

    def differentiable_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.v), self.u, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return factor_chain_linear(x, self.v, self.u, self.bias)
