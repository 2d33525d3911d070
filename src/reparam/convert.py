"""``convert``: swap the modules a recipe selects, in place, all or nothing."""
from __future__ import annotations

import dataclasses
import difflib
import warnings
from typing import Any, Iterable

import torch
from torch import nn

from .calibration import collect_stats
from .core.config import ConfigError, MethodConfig
from .core.module import state_nbytes, state_numel
from .core.registry import Method, get_method, module_config, parse_config
from .core.stats import LayerStats
from .progress import progress_bar
from .recipe import RecipeLike, Rule, parse_recipe
from .report import ConversionReport, LayerReport
from .swap import ModuleSwaps


@dataclasses.dataclass
class Planned:
    name: str
    module: nn.Module
    method: Method
    config: MethodConfig


def convert(model: nn.Module, recipe: RecipeLike, calib: Iterable[Any] | None = None, *,
            strict: bool = True, progress: bool = True) -> ConversionReport:
    """Reparameterize the modules of ``model`` that ``recipe`` selects, in place.

    Everything is validated before the model is touched: the recipe, every
    match, every layer's shape and weights, and the need for calibration
    data. A failure at any point leaves the model exactly as it was.

    Args:
        model: any ``nn.Module``; converted layers keep their device and dtype.
        recipe: see :mod:`reparam.recipe`.
        calib: model inputs (tensors, tuples of positional arguments or dicts
            of keyword arguments) for data-aware methods; statistics are
            accumulated, never the activations.
        strict: a rule that selects no supported module is an error (else a warning).
        progress: show progress bars.

    Returns:
        A :class:`ConversionReport`; ``print(report)`` shows a table with totals.

    Example:
        >>> report = reparam.convert(model, {"encoder.*": {"method": "low_rank", "size_ratio": 0.5}},
        ...                          calib=batches)
    """
    plan = plan_conversion(model, parse_recipe(recipe), strict=strict)
    _check_calibration(plan, calib)
    wanted = {p.name: p.module for p in plan if calib is not None and p.config.uses_calibration()}
    stats = collect_stats(model, calib, wanted, progress=progress) if wanted else {}
    return _swap_all(model, _resolve(plan, stats, progress=progress), stats, progress=progress)


def apply(module: nn.Module, config: MethodConfig | dict, stats: LayerStats | None = None) -> nn.Module:
    """Reparameterize one module, with the same checks as :func:`convert`.

    Returns the module itself, parametrized in place (training-time methods),
    or a new wrapper to use in its place (compression methods).

    Example:
        >>> layer = reparam.apply(nn.Linear(64, 64), {"method": "compander", "learnable": True})
    """
    config = parse_config(config)
    method = get_method(config.method)
    if not method.supports(module):
        raise ConfigError(f"method '{method.name}' supports {method.target_names}, not {type(module).__name__}")
    if config.requires_calibration() and stats is None:
        raise ConfigError(f"{config} needs calibration statistics; pass stats=reparam.LayerStats.from_inputs(x)")
    _check_module(Planned(type(module).__name__, module, method, config))
    return method.apply(module, config, stats)


def plan_conversion(model: nn.Module, rules: list[Rule], *, strict: bool = True) -> list[Planned]:
    """Which module gets which method: the first rule that can take a module wins.

    A rule can take a module when its patterns match the module's name (or
    class) and its method supports the module's type; ``None`` rules take
    every match. A rule that can take nothing is an error under ``strict``.
    """
    modules = dict(model.named_modules())
    modules.pop("", None)  # the root cannot be swapped in place
    plan: list[Planned] = []
    hits: list[list[str]] = [[] for _ in rules]
    eligible = [0] * len(rules)
    for name, module in modules.items():
        winner = None
        for i, rule in enumerate(rules):
            if not rule.matches(name, module):
                continue
            hits[i].append(name)
            if rule.config is None or get_method(rule.config.method).supports(module):
                eligible[i] += 1
                winner = rule if winner is None else winner
        if winner is not None and winner.config is not None:
            plan.append(Planned(name, module, get_method(winner.config.method), winner.config))
    for i, rule in enumerate(rules):
        if eligible[i] == 0:
            _unmatched(rule, hits[i], modules, strict)
    for item in plan:
        _check_module(item)
    return plan


def _unmatched(rule: Rule, hits: list[str], modules: dict[str, nn.Module], strict: bool) -> None:
    if not hits:
        close = difflib.get_close_matches(rule.targets[0].text, list(modules), n=5, cutoff=0.5)
        hint = f"; close module names: {close}" if close else ""
        message = f"pattern '{rule}' matches no module{hint}. Fix the pattern, or pass strict=False to skip it"
    else:
        method = get_method(rule.config.method)
        found = sorted({type(modules[h]).__name__ for h in hits})
        message = (f"pattern '{rule}' selects {len(hits)} module(s) of type {found}, but method "
                   f"'{method.name}' supports only {method.target_names}; select those layers, "
                   f"e.g. '{rule.targets[0].text}.*' for the layers inside")
    if strict:
        raise ConfigError(message)
    warnings.warn(message, stacklevel=3)


def _check_module(item: Planned) -> None:
    weight = getattr(item.module, "weight", None)
    if weight is None:
        raise ConfigError(f"layer '{item.name}' has no weight for '{item.method.name}' to reparameterize; "
                          "exclude it from the recipe")
    if isinstance(weight, torch.Tensor):
        out_features, in_features = weight.shape[0], weight.reshape(weight.shape[0], -1).shape[1]
        item.config.check_layer(item.name, in_features, out_features)
        item.config.check_weight(item.name, weight)
        if weight.device.type != "meta" and not torch.isfinite(weight).all():
            raise ValueError(f"layer '{item.name}' has NaN or Inf weights; fix or exclude it "
                             f"(add a rule '{item.name}': None before this one)")


def _check_calibration(plan: list[Planned], calib: Iterable[Any] | None) -> None:
    if calib is not None:
        return
    needy = [p for p in plan if p.config.requires_calibration()]
    if needy:
        example = needy[0]
        raise ConfigError(
            f"{len(needy)} layer(s), e.g. '{example.name}' with {example.config}, need calibration "
            f"data; pass calib=<a few batches of model inputs> to convert")


def _resolve(plan: list[Planned], stats: dict[str, LayerStats], *, progress: bool) -> list[Planned]:
    """Let each rule's config make its cross-layer decisions (see ``MethodConfig.resolve``)."""
    by_config: dict[int, list[Planned]] = {}
    for item in plan:
        by_config.setdefault(id(item.config), []).append(item)
    resolved: dict[str, MethodConfig] = {}
    for items in by_config.values():
        layers = {p.name: (p.module, stats.get(p.name)) for p in items}
        resolved.update(items[0].config.resolve(layers, progress=progress))
    # A resolved config may name another method (``method: "auto"`` picks one per layer).
    return [dataclasses.replace(p, config=resolved[p.name], method=get_method(resolved[p.name].method))
            for p in plan]


def _swap_all(model: nn.Module, plan: list[Planned], stats: dict[str, LayerStats], *,
              progress: bool) -> ConversionReport:
    rows: list[LayerReport] = []
    with ModuleSwaps(model) as swaps:
        for item in progress_bar(plan, desc="converting", disable=not progress, total=len(plan)):
            layer_stats = stats.pop(item.name, None)  # freed as we go
            before_numel, before_bytes = state_numel(item.module), state_nbytes(item.module)
            original = item.module.weight.detach().clone() if layer_stats is not None else None
            new = swaps.swap(item.name, item.method,
                             lambda old: item.method.apply(old, item.config, layer_stats))
            error = layer_stats.output_error(original, new.weight) if layer_stats is not None else None
            rows.append(LayerReport(item.name, item.method.name, before_numel, state_numel(new),
                                    before_bytes, state_nbytes(new), error, module_config(new).to_dict()))
    return ConversionReport(rows)
