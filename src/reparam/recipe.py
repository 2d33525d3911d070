"""Recipes: which modules get which method.

A recipe is an ordered mapping ``pattern -> config`` (a dict with a
``method`` key, a config object, or ``None`` to leave matches alone), or a
list of rules ``{"targets": [...], "ignore": [...], "method": ..., **config}``
(``method: None`` to leave matches alone: a rule without ``method`` is an
error, never a silent exclusion), or the path of a YAML or JSON file holding
either form. The first rule that matches a module wins.

A pattern is an exact module name, a glob (``*`` and ``?``, where ``*``
crosses dots), ``re:`` plus a regex that must match the whole name,
``suffix:`` plus the last dotted parts of a name (peft's ``target_modules``:
``suffix:query`` matches ``encoder.layer.0.attention.self.query``), a module
class name such as ``Linear``, or a callable ``filter(module, name) -> bool``
(torchao's ``filter_fn``).

A config is a dict with a ``method`` key, a config object, or the name of a
preset (``"w4-gptq"``, ``"shift_add-3bit"``; see :mod:`reparam.presets`).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from torch import nn

from .core.config import ConfigError, MethodConfig
from .core.registry import known_methods, parse_config
from .presets import PRESETS, preset

RecipeLike = Mapping[str, Any] | Sequence[Mapping[str, Any]] | str | os.PathLike


@dataclasses.dataclass(frozen=True)
class Pattern:
    text: str | Callable[[nn.Module, str], bool]

    def __post_init__(self):
        if callable(self.text):
            return
        if not isinstance(self.text, str) or not self.text or self.text in ("re:", "suffix:"):
            raise ConfigError(f"a pattern must be a non-empty string or a callable filter(module, name), "
                              f"got {self.text!r}")
        if self.text.startswith("re:"):
            try:
                re.compile(self.text[3:])
            except re.error as err:
                raise ConfigError(f"pattern {self.text!r} is not a valid regex: {err}") from err

    def matches(self, name: str, module: nn.Module) -> bool:
        if callable(self.text):
            return bool(self.text(module, name))
        if self.text.startswith("re:"):
            return re.fullmatch(self.text[3:], name) is not None
        if self.text.startswith("suffix:"):
            suffix = self.text[len("suffix:"):]
            return name == suffix or name.endswith("." + suffix)
        if any(c in self.text for c in "*?["):
            return fnmatch.fnmatchcase(name, self.text)
        return name == self.text or type(module).__name__ == self.text

    def __str__(self) -> str:
        return self.text if isinstance(self.text, str) else f"<filter {getattr(self.text, '__name__', self.text)}>"


@dataclasses.dataclass(frozen=True)
class Rule:
    """Modules matching any of ``targets`` and none of ``ignore`` get ``config``
    (``None``: leave them alone)."""

    targets: tuple[Pattern, ...]
    config: MethodConfig | None
    ignore: tuple[Pattern, ...] = ()

    def matches(self, name: str, module: nn.Module) -> bool:
        return (any(p.matches(name, module) for p in self.targets)
                and not any(p.matches(name, module) for p in self.ignore))

    def __str__(self) -> str:
        return " | ".join(str(p) for p in self.targets)


def parse_recipe(recipe: RecipeLike) -> list[Rule]:
    """Every rule of ``recipe``, checked; raises :class:`ConfigError` on the first problem."""
    if isinstance(recipe, (str, os.PathLike)):
        recipe = _read_file(Path(recipe))
    if isinstance(recipe, Mapping):
        rules = [_rule([pattern], value) for pattern, value in recipe.items()]
    elif isinstance(recipe, Sequence):
        rules = [_rule_from_entry(entry) for entry in recipe]
    else:
        raise ConfigError(f"a recipe must be a dict, a list of rules or a file path, got {type(recipe).__name__}")
    if not rules:
        raise ConfigError("the recipe is empty; give at least one pattern -> method rule")
    return rules


def _rule(targets: Sequence[Any], value: Any, ignore: Sequence[Any] = ()) -> Rule:
    if isinstance(value, str):
        value = preset(value)
    elif isinstance(value, Mapping) and isinstance(value.get("method"), str) and value["method"] in PRESETS:
        value = {**preset(value["method"]), **{k: v for k, v in value.items() if k != "method"}}
    config = None if value is None else parse_config(value)
    return Rule(tuple(Pattern(t) for t in targets), config, tuple(Pattern(p) for p in ignore))


RULE_KEYS = ("targets", "ignore", "method")


def _rule_from_entry(entry: Any) -> Rule:
    if not isinstance(entry, Mapping) or "targets" not in entry:
        raise ConfigError(f"a list recipe holds rules like {{'targets': [...], 'method': ...}}, got {entry!r}")
    if "method" not in entry:
        # Not an exclusion: a typo ('methd') or another tool's keys ('scheme') would convert nothing.
        others = sorted(set(entry) - set(RULE_KEYS))
        raise ConfigError(f"rule {dict(entry)!r} has no 'method'; set method: <name> (one of "
                          f"{known_methods()}) with its config keys, or method: null to leave the targets "
                          f"alone. Keys {others} are not rule keys {list(RULE_KEYS)}")
    entry = dict(entry)
    targets = entry.pop("targets")
    ignore = entry.pop("ignore", ())
    targets = [targets] if isinstance(targets, str) or callable(targets) else list(targets)
    ignore = [ignore] if isinstance(ignore, str) or callable(ignore) else list(ignore)
    if not targets:
        raise ConfigError(f"rule {entry!r} has no targets")
    if entry["method"] is None and len(entry) > 1:
        raise ConfigError(f"rule for {targets} has method: null (leave alone) but also "
                          f"{sorted(set(entry) - {'method'})}; an exclusion rule takes only {list(RULE_KEYS)}")
    return _rule(targets, entry if entry["method"] is not None else None, ignore)


def _read_file(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"recipe file {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix == ".json":
        return json.loads(text)
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as err:
            raise ImportError("YAML recipes need PyYAML: pip install 'reparam[yaml]'") from err
        return yaml.safe_load(text)
    raise ConfigError(f"recipe file {str(path)!r} must end in .json, .yaml or .yml")
