"""One size budget over many layers: pick one option per layer so that the
total size stays within the budget and the total error is smallest (a
multiple-choice knapsack).

Solved by dynamic programming over the budget, not by Lagrangian relaxation:
a Lagrange multiplier only reaches the points on the lower convex hull of
each layer's (size, error) curve, so it skips options that lie above the
hull but fit the budget better, and leaves part of the budget unspent
between hull vertices. With tens of layers and a budget only a few bits per
weight wide that gap is a sizeable share of the error. The DP is exact on
integer sizes; large sizes are counted in units of ``budget / resolution``
rounded *up*, so the budget is never exceeded and at most one unit per layer
is lost to rounding (≤ layers / resolution of the budget).

Sizes are the stored bytes of a converted layer's weight: everything
``state_nbytes`` counts (codes, scales, factors, indices) except the bias,
which every candidate keeps as it was, so it cannot change a choice. Bits per
weight = 8 × those bytes / (out × in). The error of a layer is its relative
output error e on the calibration inputs (``LayerStats.output_error``, the
number the report prints; the relative weight error without calibration),
and the total is Σ e⁴ over the layers. Measured on MiniLM at 3.0 bits per
weight (docs/budget.md), Σ e⁴ gave fidelity 0.909 where Σ e² gave 0.852 and
Σ e 0.796: the model's error grows faster than the squared sum says when a
few layers carry large errors (they compound through the later layers), so
the total must penalize large per-layer errors more than small ones.

``allocate`` scores every candidate for every layer by a cheap fit
(``MethodConfig.cheap``, e.g. round-to-nearest instead of GPTQ), solves,
then refits the options around each layer's choice with the real fit and
solves again. Used by ``method: "auto"`` (``reparam.methods.auto``) and by
the quantizers' ``bits="auto"`` (``reparam.core.quantized``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Generic, Hashable, Mapping, Sequence, TypeVar

import torch
from torch import nn

from .config import ConfigError, MethodConfig
from .module import linear_shape, linear_weight, state_nbytes
from .registry import get_method
from .stats import LayerStats
from ..progress import progress_bar

Key = TypeVar("Key", bound=Hashable)

# Budget units of the DP when sizes are large; the rounding loss is at most
# layers / RESOLUTION of the budget (0.5% for 200 layers).
RESOLUTION = 40_000
ERROR_POWER = 4  # the total is Σ e⁴ (see above)


@dataclasses.dataclass(frozen=True)
class Option(Generic[Key]):
    """One way to store one layer: what it is, its size (e.g. bytes) and the error it causes."""

    key: Key
    size: int
    error: float


def choose(options: Mapping[str, Sequence[Option]], budget: int, *,
           resolution: int = RESOLUTION) -> dict[str, Option]:
    """The option per layer minimizing Σ error subject to Σ size ≤ ``budget``.

    Raises ``ConfigError`` if even the smallest options exceed the budget.
    """
    names = list(options)
    smallest = sum(min(o.size for o in options[n]) for n in names)
    if smallest > budget:
        raise ConfigError(f"the size budget {budget:,} is below the smallest choice, {smallest:,}; "
                          "raise the budget or allow smaller candidates")
    unit = max(1, math.ceil(budget / resolution))
    cells = budget // unit + 1
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    # best[c]: least total error of the layers so far using at most c units.
    best = torch.zeros(cells, dtype=torch.float64)
    picks = []  # per layer: (cells,) index of the option taken at each capacity
    for name in names:
        layer = _pareto(options[name])
        new = torch.full((cells,), float("inf"), dtype=torch.float64)
        pick = torch.zeros(cells, dtype=torch.int16)
        for i, option in enumerate(layer):
            units = -(-option.size // unit)  # rounded up: the budget is never exceeded
            if units >= cells:
                continue
            shifted = torch.cat([inf.expand(units), best[:cells - units]]) + option.error
            better = shifted < new
            new = torch.where(better, shifted, new)
            pick = torch.where(better, i, pick)
        best = new
        picks.append((layer, pick))
    capacity = int(torch.argmin(best))
    if not math.isfinite(float(best[capacity])):
        raise ConfigError(f"the size budget {budget:,} is too tight for the rounding of the allocator; "
                          f"raise it slightly (smallest choice {smallest:,})")
    chosen = {}
    for name, (layer, pick) in zip(reversed(names), reversed(picks)):
        option = layer[int(pick[capacity])]
        chosen[name] = option
        capacity -= -(-option.size // unit)
    return {name: chosen[name] for name in names}


def _pareto(options: Sequence[Option]) -> list[Option]:
    """The options no other option beats in both size and error (the others can never be chosen)."""
    kept: list[Option] = []
    for option in sorted(options, key=lambda o: (o.size, o.error)):
        if not kept or option.error < kept[-1].error:
            kept.append(option)
    return kept


Layers = Mapping[str, "tuple[nn.Module, LayerStats | None]"]


def budget_bytes(layers: Layers, target_bits: float | None, target_bytes: int | None) -> int:
    """The rule's byte budget: ``target_bytes``, or ``target_bits`` per dense weight of its layers."""
    if target_bytes is not None:
        return int(target_bytes)
    weights = sum(math.prod(linear_shape(module)) for module, _ in layers.values())
    return int(target_bits * weights // 8)


def allocate(layers: Layers, candidates: Sequence[MethodConfig], budget: int, *, refine: int = 1,
             progress: bool = False) -> dict[str, MethodConfig]:
    """The candidate config per layer minimizing the total error within ``budget`` stored bytes.

    ``refine``: how many options on each side of a layer's first choice (on
    its size/error front) are refitted with their real fit before the final
    solve; 0 trusts the cheap scores.
    """
    scored: dict[str, list[Option]] = {}
    for name, (module, stats) in progress_bar(layers.items(), desc="scoring candidates", total=len(layers),
                                               disable=not progress):
        weight = linear_weight(module).detach()  # (out, in), Conv1D's too
        fits = [c for c in candidates if _fits(c, name, weight)]
        if not fits:
            raise ConfigError(f"no candidate applies to layer '{name}' ({tuple(weight.shape)}); "
                              "add candidates that fit its shape")
        scored[name] = [_score(c, c.cheap(), module, stats) for c in fits]
    chosen = choose(scored, budget)
    if refine:
        for name, (module, stats) in progress_bar(layers.items(), desc="refining", total=len(layers),
                                                   disable=not progress):
            front = _pareto(scored[name])
            at = front.index(chosen[name])
            near = {id(o) for o in front[max(0, at - refine):at + refine + 1]}
            scored[name] = [_score(o.key, o.key, module, stats)
                            if id(o) in near and o.key.cheap() != o.key else o for o in scored[name]]
        chosen = choose(scored, budget)
    return {name: option.key for name, option in chosen.items()}


def _fits(config: MethodConfig, name: str, weight: torch.Tensor) -> bool:
    try:
        config.check_layer(name, weight[0].numel(), weight.shape[0])
    except ConfigError:
        return False
    return True


def _score(config: MethodConfig, fit: MethodConfig, module: nn.Module, stats: LayerStats | None) -> Option:
    """``config``'s stored weight bytes and its error term e⁴, fitted as ``fit``."""
    new = get_method(fit.method).apply(module, fit, stats)
    weight, approx = linear_weight(module).detach(), new.weight.detach()
    if stats is not None:
        error = stats.output_error(weight, approx)
    else:
        weight, approx = weight.double(), approx.double()
        error = float((weight - approx).norm() / weight.norm().clamp_min(1e-300))
    return Option(config, weight_nbytes(new), error ** ERROR_POWER)


def weight_nbytes(module: nn.Module) -> int:
    """Stored bytes of a layer without its bias (see the module docstring)."""
    bias = getattr(module, "bias", None)
    return state_nbytes(module) - (bias.numel() * bias.element_size() if bias is not None else 0)
