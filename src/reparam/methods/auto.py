"""``method: "auto"``: one size budget for all the layers a rule selects,
spent where it lowers the output error most.

For every layer, every candidate config (any method: quantizer widths and
group sizes, low-rank ratios, the composed methods) is scored by its stored
bytes and its calibrated output error, and one candidate per layer is chosen
so that the rule's stored bits per dense weight stay within ``target_bits``
(or its bytes within ``target_bytes``) with the least total squared
relative output error (``core.budget``: a multiple-choice knapsack solved by
dynamic programming). ``resolve`` returns each layer's chosen config, so the
layers, the report and the saved file hold concrete configs of other
methods, and ``load`` needs no statistics.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

from torch import nn

from ..core.budget import Allocator, budget_bytes
from ..core.config import ConfigError, MethodConfig
from ..core.registry import Method, get_method, parse_config, register
from ..core.stats import LayerStats

# The default choice: affine from 2 to 8 bits at the default group and at
# group 64 (more scales, better at low widths), and binary coding (shift_add)
# at 2 and 3 bits, far better than affine at 2 (MiniLM fidelity 0.872
# against 0.562). The composed methods (``qera``, ``quantized_low_rank``) are
# welcome in ``candidates`` but left out here: with them the choice on
# MiniLM at 3.0 bits per weight was worse (fidelity 0.938 against 0.956)
# and took 3.8 times as long (docs/budget.md); their whitened factors fit the
# calibration inputs more closely than held-out ones.
DEFAULT_CANDIDATES: tuple[dict[str, Any], ...] = (
    *({"method": "affine", "bits": bits} for bits in (2, 3, 4, 5, 6, 8)),
    *({"method": "affine", "bits": bits, "group_size": 64} for bits in (2, 3, 4)),
    *({"method": "shift_add", "bits": bits} for bits in (2, 3)),
)


@dataclasses.dataclass(frozen=True)
class AutoConfig(MethodConfig):
    """Set ``target_bits`` (stored bits per dense weight, scales, indices and
    factors included, bias excluded) or ``target_bytes`` (the same bytes, in
    total over the rule's layers). ``candidates``: method configs (dicts) to
    choose from, default ``DEFAULT_CANDIDATES``. ``refine``: options per side
    of each layer's first choice refitted with their real (e.g. GPTQ) fit
    before the final choice; 0 keeps the cheap (round-to-nearest) scores.
    """

    method: ClassVar[str] = "auto"
    FIELD_DOCS: ClassVar[dict[str, str]] = {
        "target_bits": "stored bits per dense weight over the rule's layers (bias excluded)",
        "target_bytes": "or: stored bytes in total over the rule's layers",
        "candidates": "method configs (dicts) to choose from; default DEFAULT_CANDIDATES",
        "refine": "options per side of each layer's first choice refitted with their real fit; 0: cheap scores",
    }
    target_bits: float | None = None
    target_bytes: int | None = None
    candidates: tuple[dict[str, Any], ...] | None = None
    refine: int = 1

    def __post_init__(self):
        if (self.target_bits is None) == (self.target_bytes is None):
            raise ConfigError("auto: set exactly one of target_bits (stored bits per weight) or target_bytes")
        target = self.target_bits if self.target_bytes is None else self.target_bytes
        if isinstance(target, bool) or not isinstance(target, (int, float)) or target <= 0:
            name = "target_bits" if self.target_bytes is None else "target_bytes"
            raise ConfigError(f"auto: {name}={target!r} must be a positive number")
        if self.candidates is not None:
            if not self.candidates:
                raise ConfigError("auto: candidates is empty; list method configs to choose from, or drop it")
            # Stored as plain dicts, so the config stays JSON; parsed here to check them now.
            as_dicts = tuple(c.to_dict() if isinstance(c, MethodConfig) else dict(c) for c in self.candidates)
            for candidate in as_dicts:
                if candidate.get("method") == self.method:
                    raise ConfigError("auto: a candidate cannot itself be 'auto'")
                parse_config(candidate)
            object.__setattr__(self, "candidates", as_dicts)
        if isinstance(self.refine, bool) or not isinstance(self.refine, int) or self.refine < 0:
            raise ConfigError(f"auto: refine={self.refine!r} must be a non-negative integer")

    def choices(self) -> list[MethodConfig]:
        """The candidate configs, parsed."""
        return [parse_config(c) for c in (self.candidates or DEFAULT_CANDIDATES)]

    def uses_calibration(self) -> bool:
        return True

    def allocator(self, modules: Mapping[str, nn.Module]) -> Allocator:
        return Allocator(self.choices(), budget_bytes(modules.values(), self.target_bits, self.target_bytes),
                         refine=self.refine)


def _apply_one(module: nn.Module, config: AutoConfig, stats: LayerStats | None) -> nn.Module:
    """``reparam.apply`` of "auto" to one layer: the budget is that layer's alone."""
    chosen = config.resolve({"layer": (module, stats)})["layer"]
    return get_method(chosen.method).apply(module, chosen, stats)


def _restore(module: nn.Module, config: AutoConfig) -> nn.Module:
    raise ConfigError("auto is resolved by convert into each layer's chosen config, which is what files hold; "
                      "a file naming 'auto' was not written by reparam.save")


register(Method(AutoConfig.method, AutoConfig, (nn.Linear,), apply=_apply_one, restore=_restore))
