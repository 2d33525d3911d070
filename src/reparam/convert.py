"""``convert``: swap the modules a recipe selects, in place, all or nothing."""
from __future__ import annotations

import dataclasses
import difflib
import logging
import warnings
from typing import Any, Iterable

import torch
from torch import nn

from . import distributed, integrations
from .core.config import ConfigError, MethodConfig
from .core.module import linear_shape
from .core.registry import Method, get_method, module_config, parse_config
from .core.stats import LayerStats
from .pipeline import run_pipeline, with_configs
from .recipe import RecipeLike, Rule, parse_recipe
from .report import ConversionReport
from .tuning import BlockTuning

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Planned:
    name: str
    module: nn.Module
    method: Method
    config: MethodConfig
    aliases: tuple[str, ...] = ()  # other names the same module is registered under; converted with it


def convert(model: nn.Module, recipe: RecipeLike, calib: Iterable[Any] | None = None, *,
            strict: bool = True, progress: bool = True, pipeline: str = "auto",
            sequential_targets: str | None = None, group: Any = None,
            tune: BlockTuning | bool | None = None) -> ConversionReport:
    """Reparameterize the modules of ``model`` that ``recipe`` selects, in place.

    Everything is validated before the model is touched: the recipe, every
    match, every layer's shape and weights, and the need for calibration
    data. A failure at any point, Ctrl-C included, leaves the model exactly as
    it was; every submodule keeps its own train/eval flag, and a new module
    takes its predecessor's.

    Args:
        model: any ``nn.Module``; converted layers keep their device and dtype.
        recipe: see :mod:`reparam.recipe`.
        calib: model inputs (tensors, tuples of positional arguments or dicts
            of keyword arguments) for data-aware methods; statistics are
            accumulated, never the activations.
        strict: a rule that selects no supported module is an error (else a warning).
        progress: show progress bars.
        pipeline: how calibrated layers are converted (see :mod:`reparam.pipeline`).
            "sequential": block by block, each block calibrated on the outputs
            of the already converted blocks before it, holding one block's
            statistics at a time; "sequential_dense": block by block too, but
            each block calibrated on the unconverted model's activations (the
            statistics of one pass, in sequential's memory); "one_pass": every
            layer calibrated at once on the unconverted model; "auto"
            (default): "sequential" when the model has a stack of repeated
            blocks (e.g. a ModuleList of decoder layers) holding calibrated
            layers (it measured best at low bits: docs/llm.md), else one pass.
        sequential_targets: the block stack for sequential conversion, as a
            ModuleList's path (``"model.layers"``) or the blocks' class name
            (``"LlamaDecoderLayer"``); default: found automatically.
        group: a ``torch.distributed`` process group to convert across (see
            :mod:`reparam.distributed`); by default the initialized default
            group, if any has more than one rank. Each rank passes its own
            shard of the calibration data; every rank ends with the same model.
        tune: after each block is fitted, tune its layers' continuous tensors
            (scales, factors) together for the block's output to match the
            dense model's hidden state there, on the calibration data
            (:mod:`reparam.tuning`):
            True for the defaults, or a :class:`reparam.BlockTuning`. Needs
            block-by-block conversion. The report's output errors are the
            fits', before tuning.

    Returns:
        A :class:`ConversionReport`; ``print(report)`` shows a table with totals.

    Example:
        >>> report = reparam.convert(model, {"encoder.*": {"method": "low_rank", "size_ratio": 0.5}},
        ...                          calib=batches)
    """
    rules = parse_recipe(recipe)
    plan = plan_conversion(model, rules, strict=strict)
    _check_not_meta(plan)
    _check_calibration(plan, calib)
    untouched = _untouched(model, rules, plan)
    collective = distributed.current(group)
    logger.info("converting %d modules (%s)%s", len(plan), ", ".join(sorted({p.method.name for p in plan})),
                f" on {collective.world} ranks" if collective else "")
    rows = run_pipeline(model, plan, calib, _resolve, pipeline=pipeline, sequential_targets=sequential_targets,
                        progress=progress and (collective is None or collective.rank == 0), collective=collective,
                        tuning=BlockTuning.of(tune))
    integrations.converted(model)  # a transformers model: save_pretrained writes it compressed
    return ConversionReport(rows, untouched=untouched, communicated=collective.bytes_moved if collective else 0)


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
    # Every name, aliases included, so that a module registered twice can be selected by either name.
    modules = dict(model.named_modules(remove_duplicate=False))
    modules.pop("", None)  # the root cannot be swapped in place
    adapters = _adapter_prefixes(modules)
    plan: list[Planned] = []
    hits: list[list[str]] = [[] for _ in rules]
    eligible = [0] * len(rules)
    for name, module in modules.items():
        if any(name == prefix or _inside(name, prefix) for prefix in adapters) and not _named(name, rules):
            continue  # a peft adapter (lora_A, lora_B, ...): converted only when a rule names it exactly
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
    plan = _tied(_aliased(plan, modules), model)
    for item in plan:
        _check_module(item)
    return plan


def _adapter_prefixes(modules: dict[str, nn.Module]) -> list[str]:
    """Names of the adapter submodules of peft's tuner layers (all their children but ``base_layer``);
    found by class name, so peft is never imported here."""
    return [f"{name}.{child}" for name, module in modules.items()
            if any(cls.__name__ == "BaseTunerLayer" for cls in type(module).__mro__)
            for child, _ in module.named_children() if child != "base_layer"]


def _inside(name: str, prefix: str) -> bool:
    return name.startswith(prefix + ".")


def _named(name: str, rules: list[Rule]) -> bool:
    return any(str(p) == name for rule in rules for p in rule.targets)


def _aliased(plan: list[Planned], modules: dict[str, nn.Module]) -> list[Planned]:
    """One plan item per module object: a module registered under several names
    is converted once, and every name then holds the new module."""
    names: dict[int, list[str]] = {}
    for name, module in modules.items():
        names.setdefault(id(module), []).append(name)
    planned = {p.name: p for p in plan}
    merged: list[Planned] = []
    done: set[int] = set()
    for item in plan:
        all_names = names[id(item.module)]
        if id(item.module) in done:
            continue
        done.add(id(item.module))
        if len(all_names) > 1:
            others = [n for n in all_names if n != item.name]
            differ = [n for n in others if n not in planned or planned[n].config != item.config]
            if differ:
                raise ConfigError(
                    f"module '{item.name}' is also registered as '{differ[0]}' (one module under two names), "
                    f"and the recipe converts it as '{item.name}' but not the same way as '{differ[0]}'; "
                    f"give both names the same rule, or exclude both")
            item = dataclasses.replace(item, aliases=tuple(others))
        merged.append(item)
    return merged


def _tied(plan: list[Planned], model: nn.Module) -> list[Planned]:
    """Layers whose weight Parameter another module shares (e.g. an lm_head tied
    to the embedding) are left alone: a compression method would store the
    weight twice and untie it (a warning says so), an in-place method would
    change the other module too (an error)."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for param in module._parameters.values():
            if param is not None:
                owners.setdefault(id(param), []).append((name, module))
    kept = []
    for item in plan:
        weight = item.module._parameters.get("weight")
        sharers = [n for n, m in owners.get(id(weight), []) if m is not item.module] if weight is not None else []
        if not sharers:
            kept.append(item)
        elif item.method.undo is not None:
            raise ConfigError(
                f"layer '{item.name}' shares its weight with '{sharers[0]}' (tied weights); '{item.method.name}' "
                f"changes the weight in place and would change '{sharers[0]}' too. Exclude it (add a rule "
                f"'{item.name}': None before this one), or untie the weights first")
        else:
            warnings.warn(
                f"layer '{item.name}' shares its weight with '{sharers[0]}' (tied weights); '{item.method.name}' "
                f"would store a second copy and untie them, so '{item.name}' is left as it is. "
                f"Add a rule '{item.name}': None to silence this", stacklevel=4)
    return kept


def _check_not_meta(plan: list[Planned]) -> None:
    on_meta = [p.name for p in plan if any(t.device.type == "meta" for t in p.module.parameters())]
    if on_meta:
        raise ConfigError(
            f"layer '{on_meta[0]}' (and {len(on_meta) - 1} more) is on the meta device: it has no weights to "
            "convert. Load the weights first (e.g. from_pretrained, or to_empty() then load_state_dict); "
            "to rebuild a model saved after conversion, use reparam.load")


def _untouched(model: nn.Module, rules: list[Rule], plan: list[Planned]) -> dict[str, int]:
    """Per type, how many modules that the recipe's methods support it leaves unconverted."""
    methods = {get_method(r.config.method).name: get_method(r.config.method) for r in rules if r.config is not None}
    converted = {id(p.module) for p in plan}
    counts: dict[str, int] = {}
    for module in model.modules():
        if id(module) not in converted and any(m.supports(module) for m in methods.values()):
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    if counts.get("Conv1D") and any(str(p) == "Linear" for r in rules for p in r.targets):
        warnings.warn(f"the rule for class 'Linear' left {counts['Conv1D']} transformers Conv1D layer(s) "
                      "untouched (Linear layers with a transposed weight, as in GPT-2); select them with "
                      "'Conv1D' or by name", stacklevel=3)
    return counts


def _unmatched(rule: Rule, hits: list[str], modules: dict[str, nn.Module], strict: bool) -> None:
    if not hits:
        close = difflib.get_close_matches(str(rule.targets[0]), list(modules), n=5, cutoff=0.5)
        hint = f"; close module names: {close}" if close else ""
        message = f"pattern '{rule}' matches no module{hint}. Fix the pattern, or pass strict=False to skip it"
    elif all(module_config(modules[h]) is not None for h in hits):  # a layer takes one method
        message = (f"pattern '{rule}' selects {len(hits)} module(s) already converted with "
                   f"{sorted({module_config(modules[h]).method for h in hits})}; a layer takes one method: "
                   "fold it (reparam.fold) or start from the original model")
    else:
        method = get_method(rule.config.method)
        found = sorted({type(modules[h]).__name__ for h in hits})
        message = (f"pattern '{rule}' selects {len(hits)} module(s) of type {found}, but method "
                   f"'{method.name}' supports only {method.target_names}; select those layers, "
                   f"e.g. '{rule.targets[0]}.*' for the layers inside")
    if strict:
        raise ConfigError(message)
    warnings.warn(message, stacklevel=3)


def _check_module(item: Planned) -> None:
    weight = getattr(item.module, "weight", None)
    if weight is None:
        raise ConfigError(f"layer '{item.name}' has no weight for '{item.method.name}' to reparameterize; "
                          "exclude it from the recipe")
    if isinstance(weight, torch.Tensor) and type(weight) not in (torch.Tensor, nn.Parameter):
        raise ConfigError(f"layer '{item.name}' holds its weight as {type(weight).__name__}, a tensor subclass "
                          "(e.g. quantized by torchao's quantize_); reparam fits plain floating-point weights. "
                          "Convert the original model instead, or exclude this layer")
    if isinstance(weight, torch.Tensor):
        in_features, out_features = linear_shape(item.module)
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
    return with_configs(plan, resolved)
