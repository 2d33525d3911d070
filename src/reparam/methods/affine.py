"""Affine (uniform) quantization: the baseline every quantization result is
compared against.

Each (row, group of ``group_size`` columns) has 2^bits evenly spaced levels
w = scale·(c − zero), c ∈ [0, 2^bits): asymmetric (a zero point per group,
the range spanning the group's min and max, zero included) or symmetric
(zero fixed at 2^(bits−1)). With calibration data the fit is GPTQ's
(inherited from the ``Quantizer`` base); without, round-to-nearest.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ..core.config import check_flag
from ..core.quantized import QuantizedConfig, QuantizedLinear
from ..core.quantizer import Quantizer
from ..core.registry import register_wrapper


@dataclasses.dataclass(frozen=True)
class AffineConfig(QuantizedConfig):
    """``bits`` 2 to 8 (or "auto" with ``target_bits``); ``symmetric`` drops the zero point."""

    method: ClassVar[str] = "affine"
    FIELD_DOCS: ClassVar[dict[str, str]] = {
        "symmetric": "levels symmetric around zero (no zero point stored)",
    }
    BITS: ClassVar[tuple[int, ...]] = (2, 3, 4, 5, 6, 7, 8)
    symmetric: bool = False

    def __post_init__(self):
        super().__post_init__()
        check_flag(self.method, "symmetric", self.symmetric)

    def quantizer(self, bits: int | None = None) -> Quantizer:
        return Affine(bits or self.bits, self.group_size, self.symmetric)


class Affine(Quantizer):
    """Min-max affine levels; params are (scale, zero), or (scale,) when symmetric."""

    def __init__(self, bits: int, group_size: int, symmetric: bool):
        super().__init__(bits, group_size)
        self.symmetric = symmetric
        self.params_per_group = 1 if symmetric else 2

    def fit_group(self, weight: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
        top = 2 ** self.bits - 1
        low = weight.min(1).values.clamp_max(0)
        high = weight.max(1).values.clamp_min(0)
        if self.symmetric:
            high = torch.maximum(high, -low)
            return (2 * high / top).clamp_min(1e-8)[:, None]
        scale = ((high - low) / top).clamp_min(1e-8)
        return torch.stack([scale, torch.round(-low / scale)], -1)

    def encode(self, params: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # Evenly spaced levels: rounding is the nearest level, without comparing against all 2^bits.
        scale = params[:, :1]
        zero = 2 ** (self.bits - 1) if self.symmetric else params[:, 1:]
        return torch.round(weight / scale + zero).clamp(0, 2 ** self.bits - 1).to(torch.int64)

    def linear_form(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = params[..., 0]
        zero = 2 ** (self.bits - 1) if self.symmetric else params[..., 1]
        powers = 2.0 ** torch.arange(self.bits, dtype=params.dtype, device=params.device)
        return powers.view(-1, *[1] * scale.dim()) * scale, -zero * scale


@register_wrapper(AffineConfig)
class AffineLinear(QuantizedLinear):
    """``nn.Linear`` with uniformly quantized weights: ``bits`` packed planes, fp16 scale and zero."""
