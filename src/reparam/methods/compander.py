"""Weight compander (Cakaj, Mehnert, Yang, IJCNN 2023): w = Ψ(v) = a·atan(v/b).

|w| < aπ/2, so a caps the weights' magnitude; the slope a/(b(1 + v²/b²)) is
largest near zero, so small weights move more and are pushed away from zero.
A training-time method: it parametrizes a layer's weight in place with
``torch.nn.utils.parametrize`` (state_dict, ``remove_parametrizations`` and
``cached()`` keep working) instead of replacing the layer.

    reparam.convert(model, {"Linear": {"method": "compander"}})
    reparam.fold(model)  # bake Ψ(v) into plain weights for inference
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..core.config import ConfigError, MethodConfig, check_range
from ..core.registry import Method, register
from ..core.stats import LayerStats

TARGETS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# With a="auto", the largest |w| sits at this fraction of the cap aπ/2: there
# v = b·tan(π/4) = b and the slope is half its value at zero, so large
# pretrained weights stay trainable instead of saturating.
AUTO_HEADROOM = 0.5
# The paper assumes a, b ≥ 0.5.
MIN_A = 0.5
# Accepted a and b. Outside, Ψ(v) = a·atan(v/b) and v = b·tan(w/a) lose the
# layer in low precision: b = 1e-300 is 0 in float32 (v/b = 0/0), a = 1e300
# is inf, and fp16 tops out at 65504. Real weights have |w| far below aπ/2 = 1.6e3.
A_RANGE = (1e-3, 1e3)
B_RANGE = (1e-3, 1e3)


@dataclasses.dataclass(frozen=True)
class CompanderConfig(MethodConfig):
    method: ClassVar[str] = "compander"
    FIELD_DOCS: ClassVar[dict[str, str]] = {
        "a": 'cap aπ/2 on |w|, in [0.001, 1000]; "auto": per layer, max|w| at half the cap, never below 0.5',
        "b": "stretch of the curve, in [0.001, 1000]; 1.0 is the paper's init for learnable b",
        "learnable": "train one (a, b) pair per layer (the paper's best setting)",
    }
    a: float | str = "auto"  # cap aπ/2 on |w|; "auto": per layer, max|w| at half the cap, never below 0.5
    b: float = 1.0  # stretch of the curve; 1.0 is the paper's init for learnable b
    learnable: bool = False  # one (a, b) pair per layer, trained ("fine" in the paper, its best setting)

    def __post_init__(self):
        if self.a != "auto":
            check_range(self.method, "a", self.a, *A_RANGE)
        check_range(self.method, "b", self.b, *B_RANGE)
        if not isinstance(self.learnable, bool):
            raise ConfigError(f"compander: learnable={self.learnable!r} must be true or false")

    def check_weight(self, name: str, weight: torch.Tensor) -> None:
        if weight.device.type == "meta":
            return
        if self.a == "auto":
            if self.a_for(weight) > A_RANGE[1]:
                raise ConfigError(f"compander: layer '{name}' has |w| up to {float(weight.detach().abs().max()):.4g}, "
                                  f"so a='auto' would exceed a's range {list(A_RANGE)}; rescale or exclude the layer")
            return
        peak = float(weight.detach().abs().max())
        if peak >= self.a * math.pi / 2:
            raise ConfigError(
                f"compander: layer '{name}' has |w| up to {peak:.4g}, at or above the cap aπ/2 = "
                f"{self.a * math.pi / 2:.4g} for a={self.a}; use a > {2 * peak / math.pi:.4g}, or a='auto'")

    def a_for(self, weight: torch.Tensor) -> float:
        if self.a != "auto":
            return float(self.a)
        if weight.device.type == "meta":
            return 1.0  # a skeleton for load: the saved a overwrites it
        return max(MIN_A, float(weight.detach().abs().max()) / (AUTO_HEADROOM * math.pi / 2))


class Compander(nn.Module):
    """The parametrization: ``forward(v) = a·atan(v/b)``, ``right_inverse(w) = b·tan(w/a)``.

    a and b are stored as logarithms, so they stay positive by construction
    when learnable; fixed ones are buffers, saved with the model either way.
    """

    def __init__(self, a: float, b: float, learnable: bool, device=None):
        super().__init__()
        log_a = torch.tensor(math.log(a), device=device)
        log_b = torch.tensor(math.log(b), device=device)
        if learnable:
            self.log_a, self.log_b = nn.Parameter(log_a), nn.Parameter(log_b)
        else:
            self.register_buffer("log_a", log_a)
            self.register_buffer("log_b", log_b)

    @property
    def a(self) -> torch.Tensor:
        return self.log_a.exp()

    @property
    def b(self) -> torch.Tensor:
        return self.log_b.exp()

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if v.is_cuda:
            from ..kernels.compander import CompanderFunction  # triton only where it runs
            return CompanderFunction.apply(v, self.a, self.b)
        return self.a * torch.atan(v / self.b)  # two fused-by-torch elementwise ops on CPU

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        # In float64: tan is steep near the cap, and the outputs must not move at wrapping time.
        v = self.b.double() * torch.tan(w.double() / self.a.double())
        return v.to(w.dtype)

    def slope(self, v: torch.Tensor) -> torch.Tensor:
        """∂Ψ/∂v = a / (b·(1 + v²/b²)), elementwise."""
        return self.a / (self.b * (1 + (v / self.b) ** 2))


def _check_state(module: nn.Module, state) -> None:
    """Loaded a and b must be positive and finite in the layer's dtype (learned ones may leave A_RANGE)."""
    for key in ("log_a", "log_b"):
        value = state[f"parametrizations.weight.0.{key}"]
        if not (value.exp().isfinite() & (value.exp() > 0)).all():
            raise ValueError(f"{key}={float(value):.4g} makes {key[-1]} = exp({key}) zero or infinite in "
                             f"{value.dtype}")


def companders(model: nn.Module):
    """(module, Compander) for every companded weight in ``model``."""
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            for p in module.parametrizations.weight:
                if isinstance(p, Compander):
                    yield module, p


def _apply(module: nn.Module, config: CompanderConfig, stats: LayerStats | None = None) -> nn.Module:
    weight = module.weight
    compander = Compander(config.a_for(weight), config.b, config.learnable, device=weight.device)
    parametrize.register_parametrization(module, "weight", compander)
    module.reparam_config = config
    return module


def _undo(module: nn.Module) -> None:
    # The values are put back by the caller (ModuleSwaps restores the state it saved).
    parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    del module.reparam_config


register(Method("compander", CompanderConfig, TARGETS, apply=_apply,
                restore=lambda module, config: _apply(module, config), undo=_undo, check_state=_check_state))
