"""One size budget over many layers: pick one option per layer so that the
total size stays within the budget and the total error is smallest (a
multiple-choice knapsack).

Solved by dynamic programming over the budget, not by Lagrangian relaxation:
a Lagrange multiplier only reaches the points on the lower convex hull of
each layer's (size, error) curve, so it skips options that lie above the
hull but fit the budget better, and leaves part of the budget unspent
between hull vertices. With tens of layers and a budget only a few bits per
weight wide that gap is a sizeable share of the error. The DP is exact on
integer sizes; it runs over the bytes each layer spends above its smallest
option, counted, when large, in units of ``spare / resolution`` rounded *up*
(spare: the budget left after every layer's smallest option), so the budget
is never exceeded, a budget that fits the smallest options always has a
solution, and at most one unit per layer is lost to rounding.

Sizes are the stored bytes of a converted layer's weight: everything
``state_nbytes`` counts (codes, scales, factors, indices) except the bias,
which every candidate keeps as it was, so it cannot change a choice. Bits per
weight = 8 × those bytes / (out × in).

The error of a layer, with calibration, is the growth of the model's loss
its weight error causes, to second order: Σ_o s_o·‖(W − Ŵ)_o X‖², s the
layer's output sensitivity (``reparam.sensitivity``, ``LayerStats.weighted_error``).
Those are in one unit for all layers, so the total is their plain sum. It
replaced Σ e⁴ of the relative output errors e (the number the report
prints), which treated every layer as equally important: on MiniLM (the same
GPTQ fits of affine and shift_add candidates, docs/budget.md) it raised
fidelity at 3.0 bits per weight from 0.933 to 0.956 and at 3.5 from 0.961
to 0.975. Without calibration there is no sensitivity: the error is the
relative weight error e = ‖W − Ŵ‖/‖W‖ and the total Σ e⁴ (large errors
compound through later layers, so they must cost more than their squares).

``allocate`` scores every candidate for every layer by a cheap fit
(``MethodConfig.cheap``, e.g. round-to-nearest instead of GPTQ), solves,
then refits the options around each layer's choice with the real fit and
solves again. Used by ``method: "auto"`` (``reparam.methods.auto``) and by
the quantizers' ``bits="auto"`` (``reparam.core.quantized``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Generic, Hashable, Iterable, Mapping, Sequence, TypeVar

import torch
from torch import nn

from .config import ConfigError, MethodConfig
from .module import linear_shape, linear_weight, state_nbytes
from .registry import get_method
from .stats import LayerStats
from ..progress import progress_bar

Key = TypeVar("Key", bound=Hashable)

# Budget units of the DP when sizes are large; the rounding loss is at most
# layers / RESOLUTION of the spare budget (0.5% of it for 200 layers).
RESOLUTION = 40_000
ERROR_POWER = 4  # without calibration the total is Σ e⁴ of relative weight errors (see above)


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
    floors = {n: min(o.size for o in options[n]) for n in names}
    smallest = sum(floors.values())
    if smallest > budget:
        raise ConfigError(f"the size budget {budget:,} is below the smallest choice, {smallest:,}; "
                          "raise the budget or allow smaller candidates")
    # The DP runs over the bytes each layer spends above its smallest option,
    # so the all-smallest choice always fits, however the units round.
    spare = budget - smallest
    unit = max(1, math.ceil(spare / resolution))
    cells = spare // unit + 1
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    # best[c]: least total error of the layers so far using at most c units above their floors.
    best = torch.zeros(cells, dtype=torch.float64)
    picks = []  # per layer: (cells,) index of the option taken at each capacity
    for name in names:
        layer = _pareto(options[name])
        new = torch.full((cells,), float("inf"), dtype=torch.float64)
        pick = torch.zeros(cells, dtype=torch.int16)
        for i, option in enumerate(layer):
            units = -(-(option.size - floors[name]) // unit)  # rounded up: the budget is never exceeded
            if units >= cells:
                continue
            shifted = torch.cat([inf.expand(units), best[:cells - units]]) + option.error
            better = shifted < new
            new = torch.where(better, shifted, new)
            pick = torch.where(better, i, pick)
        best = new
        picks.append((layer, pick))
    capacity = int(torch.argmin(best))
    chosen = {}
    for name, (layer, pick) in zip(reversed(names), reversed(picks)):
        option = layer[int(pick[capacity])]
        chosen[name] = option
        capacity -= -(-(option.size - floors[name]) // unit)
    return {name: chosen[name] for name in names}


def _pareto(options: Sequence[Option]) -> list[Option]:
    """The options no other option beats in both size and error (the others can never be chosen)."""
    kept: list[Option] = []
    for option in sorted(options, key=lambda o: (o.size, o.error)):
        if not kept or option.error < kept[-1].error:
            kept.append(option)
    return kept


Layers = Mapping[str, "tuple[nn.Module, LayerStats | None]"]


def budget_bytes(modules: Iterable[nn.Module], target_bits: float | None, target_bytes: int | None) -> int:
    """A rule's byte budget: ``target_bytes``, or ``target_bits`` per dense weight of its layers."""
    if target_bytes is not None:
        return int(target_bytes)
    weights = sum(math.prod(linear_shape(module)) for module in modules)
    return int(target_bits * weights // 8)


class Allocator:
    """One size budget over a rule's layers, solved in steps, for callers that
    see the layers' statistics a few at a time (block-by-block conversion):

    1. :meth:`score` every layer (cheap fits of every candidate);
    2. :meth:`solve`; if :attr:`refine`, :meth:`refine_layer` every layer (the
       options next to its first choice refitted with their real fit) and
       :meth:`solve` again;
    3. :attr:`chosen` holds each layer's config.

    ``refine``: options on each side of a layer's first choice (on its
    size/error front) refitted; 0 trusts the cheap scores.
    """

    def __init__(self, candidates: Sequence[MethodConfig], budget: int, *, refine: int = 1):
        self.candidates, self.budget, self.refine = list(candidates), budget, refine
        self.scored: dict[str, list[Option]] = {}
        self.first: dict[str, Option] | None = None  # the first solve's choice, which refinement works around
        self.chosen: dict[str, MethodConfig] = {}

    def score(self, name: str, module: nn.Module, stats: LayerStats | None) -> None:
        weight = linear_weight(module).detach()  # (out, in), Conv1D's too
        fits = [c for c in self.candidates if _fits(c, name, weight)]
        if not fits:
            raise ConfigError(f"no candidate applies to layer '{name}' ({tuple(weight.shape)}); "
                              "add candidates that fit its shape")
        self.scored[name] = [_score(c, c.cheap(), module, stats) for c in fits]

    def refine_layer(self, name: str, module: nn.Module, stats: LayerStats | None) -> None:
        front = _pareto(self.scored[name])
        at = front.index(self.first[name])
        near = {id(o) for o in front[max(0, at - self.refine):at + self.refine + 1]}
        self.scored[name] = [_score(o.key, o.key, module, stats) if id(o) in near and o.key.cheap() != o.key else o
                             for o in self.scored[name]]

    def solve(self) -> None:
        chosen = choose(self.scored, self.budget)
        self.first = chosen if self.first is None else self.first
        self.chosen = {name: option.key for name, option in chosen.items()}


def allocate(layers: Layers, allocator: Allocator, *, progress: bool = False) -> dict[str, MethodConfig]:
    """Each layer's config from ``allocator``, with every layer's statistics at hand."""
    for name, (module, stats) in progress_bar(layers.items(), desc="scoring candidates", total=len(layers),
                                               disable=not progress):
        allocator.score(name, module, stats)
    allocator.solve()
    if allocator.refine:
        for name, (module, stats) in progress_bar(layers.items(), desc="refining", total=len(layers),
                                                   disable=not progress):
            allocator.refine_layer(name, module, stats)
        allocator.solve()
    return allocator.chosen


def _fits(config: MethodConfig, name: str, weight: torch.Tensor) -> bool:
    try:
        config.check_layer(name, weight[0].numel(), weight.shape[0])
    except ConfigError:
        return False
    return True


def _score(config: MethodConfig, fit: MethodConfig, module: nn.Module, stats: LayerStats | None) -> Option:
    """``config``'s stored weight bytes and its error term (see the module docstring), fitted as ``fit``."""
    new = get_method(fit.method).apply(module, fit, stats)
    weight, approx = linear_weight(module).detach(), new.weight.detach()
    if stats is not None and stats.sensitivity is not None:
        return Option(config, weight_nbytes(new), stats.weighted_error(weight, approx))
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
