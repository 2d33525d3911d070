"""The ``Factorizer`` base: a weight matrix (plus optional calibration
statistics) in, factors out. Pure functions of float64 CPU tensors; modules
only store what a factorizer returns."""
from __future__ import annotations

import abc
from typing import ClassVar

import torch

from .stats import LayerStats


class Factorizer(abc.ABC):
    """Turns W (out, in) into factors whose product approximates it.

    ``requires_stats`` factorizers minimize the output error ‖(W − Ŵ)X‖ on
    calibration inputs X rather than the weight error ‖W − Ŵ‖.
    """

    name: ClassVar[str]
    requires_stats: ClassVar[bool] = False

    @abc.abstractmethod
    def factorize(self, weight: torch.Tensor, stats: LayerStats | None) -> tuple[torch.Tensor, ...]:
        """Factors of a float64 (out, in) weight, in float64."""


class InputSpace(abc.ABC):
    """An invertible right-transform T of the weight, chosen from calibration
    statistics, such that a weight-error fit of W·T mapped back by T⁻¹ weighs
    errors the way the layer's inputs do."""

    @abc.abstractmethod
    def whiten(self, weight: torch.Tensor) -> torch.Tensor:
        """W·T."""

    @abc.abstractmethod
    def unwhiten(self, whitened: torch.Tensor) -> torch.Tensor:
        """A·T⁻¹."""


class Identity(InputSpace):
    """Plain weight error (data-free fits)."""

    def whiten(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def unwhiten(self, whitened: torch.Tensor) -> torch.Tensor:
        return whitened


class ChannelScaling(InputSpace):
    """T = diag(s): input channels weighted by their activation size (ASVD,
    Yuan et al. 2023, with s = mean|x|^α)."""

    def __init__(self, scale: torch.Tensor):
        # Dead channels would make T singular; they get the smallest live scale.
        live = scale[scale > 0]
        self.scale = scale.clamp_min(live.min() if live.numel() else 1.0)  # (in,)

    def whiten(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.scale

    def unwhiten(self, whitened: torch.Tensor) -> torch.Tensor:
        return whitened / self.scale


class Whitening(InputSpace):
    """T = L with G = Σ xᵀx = L Lᵀ (Cholesky): ‖(W − Ŵ)X‖_F = ‖(W − Ŵ)L‖_F,
    so the output error becomes a weight error (SVD-LLM, Wang et al. 2024).

    Calibration Grams are often singular (dead channels, fewer tokens than
    channels); then G is shifted by its smallest eigenvalue plus a small
    ridge, as SVD-LLM does.
    """

    # Ridge relative to the mean diagonal; small enough not to bias the fit.
    RIDGE = 1e-6

    def __init__(self, gram: torch.Tensor):
        gram = gram.to(torch.float64)
        shifted = (gram + gram.T) / 2  # shifted on its diagonal in place: no (in, in) identity
        ridge = self.RIDGE * shifted.diagonal().mean().clamp_min(1e-12)
        shifted.diagonal().add_(ridge)
        chol, info = torch.linalg.cholesky_ex(shifted)
        if info != 0:
            lowest = torch.linalg.eigvalsh(shifted)[0] - ridge
            shifted.diagonal().add_((-lowest).clamp_min(0))
            chol = torch.linalg.cholesky(shifted)
        self.chol = chol  # (in, in) lower triangular L

    def whiten(self, weight: torch.Tensor) -> torch.Tensor:
        return weight @ self.chol

    def unwhiten(self, whitened: torch.Tensor) -> torch.Tensor:
        # A·L⁻¹ by a triangular solve (Lᵀ Yᵀ = Aᵀ), not an explicit inverse.
        return torch.linalg.solve_triangular(self.chol.T, whitened.T, upper=True).T


class TruncatedSVD(Factorizer):
    """Best rank-r fit of W·T, returned as U = U_r Σ_r^½, V = Σ_r^½ V_rᵀ T⁻¹
    (the square root split keeps both factors on the same scale, which
    matters for fine-tuning and for low-precision storage)."""

    def __init__(self, rank: int, space: InputSpace):
        self.rank = rank
        self.space = space

    def factorize(self, weight: torch.Tensor, stats: LayerStats | None) -> tuple[torch.Tensor, torch.Tensor]:
        u, s, vh = torch.linalg.svd(self.space.whiten(weight), full_matrices=False)
        root = s[: self.rank].sqrt()
        return u[:, : self.rank] * root, self.space.unwhiten(root[:, None] * vh[: self.rank])


def factor_budget(size_ratio: float, in_features: int, out_features: int, bias: bool) -> float:
    """How many weight-dtype elements a compressed weight may take so that the
    whole layer (weight and bias, which stays dense) keeps ``size_ratio`` of its bytes."""
    dense_bias = out_features if bias else 0
    return size_ratio * (out_features * in_features + dense_bias) - dense_bias


def rank_for_ratio(size_ratio: float, in_features: int, out_features: int, bias: bool) -> int:
    """Largest r whose factors U (out, r), V (r, in) fit the layer's ``size_ratio`` budget."""
    rank = int(factor_budget(size_ratio, in_features, out_features, bias) // (out_features + in_features))
    return max(1, min(rank, in_features, out_features))
