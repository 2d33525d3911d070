"""Scale vectors in magnitude-direction form ("Negligible in Size, Significant
in Effect", arXiv 2605.26895; only its abstract was readable, see docs).

- On a normalization layer: γ = m · d/‖d‖, a global magnitude m times a
  direction d (``torch.nn.utils.parametrizations.weight_norm``'s form, for a
  vector).
- On a Linear layer: W ↦ diag(u)·W·diag(v), scale vectors on both sides of
  the map, each in magnitude-direction form u = m_u · d_u/‖d_u‖.

Identity at initialization: outputs are unchanged at the moment of wrapping.
A training-time method (a parametrization, in place); ``reparam.fold`` bakes
it into plain weights for inference, exactly.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..core.config import ConfigError, MethodConfig, check_choice
from ..core.registry import Method, register
from ..core.stats import LayerStats

NORMS = (nn.LayerNorm, nn.RMSNorm)
TARGETS = (nn.Linear, *NORMS)
SIDES = ("both", "rows", "columns")


@dataclasses.dataclass(frozen=True)
class ScaleVectorConfig(MethodConfig):
    method: ClassVar[str] = "scale_vector"
    FIELD_DOCS: ClassVar[dict[str, str]] = {
        "sides": 'Linear only: diag(u)·W·diag(v) ("both"), diag(u)·W ("rows") or W·diag(v) ("columns")',
    }
    sides: str = "both"  # Linear only: diag(u)·W·diag(v) ("both"), diag(u)·W ("rows") or W·diag(v) ("columns")

    def __post_init__(self):
        check_choice(self.method, "sides", self.sides, SIDES)

    def check_weight(self, name: str, weight: torch.Tensor) -> None:
        # A norm's γ (1-D) becomes m·d/‖d‖: an all-zero γ gives 0/0 = NaN.
        if weight.dim() == 1 and weight.device.type != "meta" and not weight.detach().abs().sum() > 0:
            raise ConfigError(f"scale_vector: the scale γ of layer '{name}' is all zero, which has no direction "
                              "(m·d/‖d‖ would be NaN); exclude the layer or initialize γ first")


class MagnitudeDirection(nn.Module):
    """A vector as m · d/‖d‖: ``original`` holds d, ``magnitude`` holds m."""

    def __init__(self, vector: torch.Tensor):
        super().__init__()
        self.magnitude = nn.Parameter(vector.detach().norm())

    def forward(self, direction: torch.Tensor) -> torch.Tensor:
        return self.magnitude * direction / direction.norm()

    def right_inverse(self, vector: torch.Tensor) -> torch.Tensor:
        return vector


class RowColumnScales(nn.Module):
    """W ↦ diag(u)·W·diag(v), u and v each a magnitude times a direction;
    u = v = 1 at initialization (direction 1/√n, magnitude √n)."""

    def __init__(self, out_features: int, in_features: int, sides: str, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.rows = sides in ("both", "rows")
        self.columns = sides in ("both", "columns")
        if self.rows:
            self.row_magnitude = nn.Parameter(torch.tensor(math.sqrt(out_features), **kw))
            self.row_direction = nn.Parameter(torch.full((out_features,), 1 / math.sqrt(out_features), **kw))
        if self.columns:
            self.column_magnitude = nn.Parameter(torch.tensor(math.sqrt(in_features), **kw))
            self.column_direction = nn.Parameter(torch.full((in_features,), 1 / math.sqrt(in_features), **kw))

    def row_scale(self) -> torch.Tensor:
        return self.row_magnitude * self.row_direction / self.row_direction.norm()  # (out,)

    def column_scale(self) -> torch.Tensor:
        return self.column_magnitude * self.column_direction / self.column_direction.norm()  # (in,)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.rows:
            weight = self.row_scale()[:, None] * weight
        if self.columns:
            weight = weight * self.column_scale()[None, :]
        return weight


def _apply(module: nn.Module, config: ScaleVectorConfig, stats: LayerStats | None = None) -> nn.Module:
    weight = module.weight
    if isinstance(module, nn.Linear):
        scales = RowColumnScales(module.out_features, module.in_features, config.sides,
                                 device=weight.device, dtype=weight.dtype)
    else:
        scales = MagnitudeDirection(weight)
    parametrize.register_parametrization(module, "weight", scales)
    module.reparam_config = config
    return module


def _check_state(module: nn.Module, state) -> None:
    """Every direction the file holds must have a nonzero norm (it is divided by it)."""
    directions = [k for k in state if k.endswith("_direction")]
    if isinstance(module, NORMS):
        directions.append("parametrizations.weight.original")
    for key in directions:
        if not state[key].abs().sum() > 0:
            raise ValueError(f"'{key}' is all zero: a direction needs a nonzero norm")


def _undo(module: nn.Module) -> None:
    parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    del module.reparam_config


register(Method("scale_vector", ScaleVectorConfig, TARGETS, apply=_apply, restore=_apply, undo=_undo,
                check_state=_check_state))
