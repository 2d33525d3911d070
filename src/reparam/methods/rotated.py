"""Quantization after a random orthogonal rotation of the inputs (incoherence
processing: QuIP#, Tseng et al. 2024, arXiv 2402.04396; QuaRot, Ashkboos et
al. 2024, arXiv 2404.00456): W ≈ Q(W·R)·Rᵀ.

R = D·H·C is orthogonal: D a diagonal of random signs (from ``seed``); H
block-diagonal with normalized Hadamard blocks of ``block`` columns (the
largest power of two up to ``block`` dividing the layer's width); C an
orthonormal DCT across the blocks (position k of every block mixed with
position k of the others; 384 = 3 blocks of 128 get a 3-point DCT). Since
x·Wᵀ = (x·R)·(W·R)ᵀ, the layer quantizes W·R with any quantization method
(``base``) on the rotated calibration Gram Rᵀ·G·R, and its forward rotates x
first. The rotation spreads each row's outliers over the whole row, so the
rotated rows are close to Gaussian and one set of scales fits all of a row:
with ``group_size="row"``, MiniLM's shift_add 3-bit at 3.09 bits per weight
reached 0.967 fidelity rotated (Hadamard blocks alone) against 0.961
unrotated (docs/budget.md). R is rebuilt from the config, never stored: the
bytes are the base's.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ..core.config import ConfigError
from ..core.module import ReparamModule
from ..core.quantized import QuantizedBaseConfig, QuantizedLinear
from ..core.registry import register_wrapper
from ..core.stats import LayerStats

MAX_BLOCK = 128


@dataclasses.dataclass(frozen=True)
class RotatedConfig(QuantizedBaseConfig):
    """``base``: the quantization config of W·R (a dict, e.g. ``{"method": "shift_add", "bits": 3,
    "group_size": "row"}``; default affine 4-bit). ``block``: the Hadamard blocks' largest width (a power of
    two); ``seed``: the random signs'."""

    method: ClassVar[str] = "rotated"
    FIELD_DOCS: ClassVar[dict[str, str]] = {
        "base": 'the quantization config of the rotated weight, e.g. {"method": "shift_add", "bits": 3}',
        "block": "largest Hadamard block (a power of two); each layer uses the largest dividing its width",
        "seed": "seed of the random signs (the rotation is rebuilt from it, never stored)",
    }
    block: int = MAX_BLOCK
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 2 \
                or self.block & (self.block - 1):
            raise ConfigError(f"{self.method}: block={self.block!r} must be a power of two ≥ 2, e.g. 128")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"{self.method}: seed={self.seed!r} must be a non-negative integer")

    def block_for(self, in_features: int) -> int:
        """The largest power of two up to ``block`` dividing ``in_features``."""
        return min(self.block, in_features & -in_features)

    def check_layer(self, name: str, in_features: int, out_features: int) -> None:
        if self.block_for(in_features) < 2:
            raise ConfigError(f"{self.method}: layer '{name}' has an odd number of inputs ({in_features}); a "
                              "Hadamard rotation needs an even width, so quantize this layer without rotation")
        self.base_config.check_layer(name, in_features, out_features)

    def uses_calibration(self) -> bool:
        return self.base_config.uses_calibration()

    def fitting_cost(self, in_features: int, out_features: int) -> float:
        return self.base_config.fitting_cost(in_features, out_features)


def hadamard(size: int) -> torch.Tensor:
    """The normalized (orthogonal, symmetric) Sylvester Hadamard matrix of a power-of-two ``size``, float64."""
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < size:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)])
    return matrix / size ** 0.5


def dct(size: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix of any ``size``, float64: it spreads every input over every output."""
    frequency = torch.arange(size, dtype=torch.float64)[:, None]
    position = torch.arange(size, dtype=torch.float64)[None]
    matrix = torch.cos(torch.pi * (position + 0.5) * frequency / size) * (2 / size) ** 0.5
    matrix[0] /= 2 ** 0.5
    return matrix


@register_wrapper(RotatedConfig)
class RotatedLinear(ReparamModule):
    """``nn.Linear`` with W = Q·Rᵀ: ``quantized`` (a bias-free ``QuantizedLinear`` holding Q ≈ W·R) applied to
    x·R. R = D·H·C (``signs``; ``within``, a Hadamard on each block; ``across``, a DCT mixing the blocks) is
    rebuilt from the config: non-persistent buffers."""

    def __init__(self, in_features: int, out_features: int, bias: bool, config: RotatedConfig, *,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, config, device=device, dtype=dtype)
        self.quantized = QuantizedLinear(in_features, out_features, False, config.base_config,
                                         device=device, dtype=dtype)
        generator = torch.Generator().manual_seed(config.seed)
        signs = torch.randint(0, 2, (in_features,), generator=generator, dtype=torch.float64) * 2 - 1
        block = config.block_for(in_features)
        self.register_buffer("signs", signs.to(device), persistent=False)
        self.register_buffer("within", hadamard(block).to(device), persistent=False)
        self.register_buffer("across", dct(in_features // block).to(device), persistent=False)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x·R over the last dimension, in x's dtype: signs, a Hadamard on each block, then a DCT across the
        blocks (one set of scales per row needs the blocks' magnitudes evened out too)."""
        blocks = (x * self.signs.to(x.dtype)).unflatten(-1, self.across.shape[:1] + self.within.shape[:1])
        return (self.across.to(x.dtype) @ (blocks @ self.within.to(x.dtype))).flatten(-2)

    def unrotate(self, x: torch.Tensor) -> torch.Tensor:
        """x·Rᵀ = x·R⁻¹: the steps of ``rotate`` undone in reverse (the Hadamard is its own inverse)."""
        blocks = x.unflatten(-1, self.across.shape[:1] + self.within.shape[:1])
        return ((self.across.T.to(x.dtype) @ blocks) @ self.within.to(x.dtype)).flatten(-2) * self.signs.to(x.dtype)

    def fit(self, weight: torch.Tensor, stats: LayerStats | None) -> None:
        rotated_stats = None
        if stats is not None:
            # Rᵀ·G·R: rotate the Gram's rows, then its columns (G is symmetric). The inputs' absolute sums do
            # not survive a rotation; quantizers read only the Gram.
            gram = self.rotate(self.rotate(stats.gram).T).T
            rotated_stats = LayerStats(gram=gram, abs_sum=torch.zeros_like(stats.abs_sum), count=stats.count)
        self.quantized.fit(self.rotate(weight), rotated_stats)

    def materialize(self) -> torch.Tensor:
        return self.unrotate(self.quantized.materialize().to(torch.float64)).to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.quantized(self.rotate(x))
        return y + self.bias if self.bias is not None else y
