"""Method configs: one frozen dataclass per method, checked on construction,
round-tripping through plain dicts (and so JSON, YAML and safetensors metadata)."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .budget import Allocator
    from .stats import LayerStats


class ConfigError(ValueError):
    """A recipe or config is invalid; the message names the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Base of every method's config.

    Subclasses are frozen dataclasses that set ``method`` (the registry name)
    and check their fields in ``__post_init__`` by raising :class:`ConfigError`.
    ``FIELD_DOCS`` says what each field means; ``help(SomeConfig)`` lists
    every field, inherited ones included, under "Attributes".
    """

    method: ClassVar[str] = ""
    FIELD_DOCS: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        docs: dict[str, str] = {}
        for base in reversed(cls.__mro__):
            docs.update(base.__dict__.get("FIELD_DOCS", {}))
        if docs:  # runs before @dataclass, which keeps a docstring it finds
            lines = "".join(f"        {name}: {text}\n" for name, text in docs.items())
            cls.__doc__ = f"{(cls.__doc__ or cls.__name__).rstrip()}\n\n    Attributes:\n{lines}"

    def requires_calibration(self) -> bool:
        """True when this config cannot be applied without calibration data."""
        return False

    def uses_calibration(self) -> bool:
        """True when statistics are used if calibration data is given."""
        return self.requires_calibration()

    def allocator(self, modules: Mapping[str, nn.Module]) -> Allocator | None:
        """For a config that spends one size budget over the rule's layers
        (``modules``, name -> layer): the :class:`~reparam.core.budget.Allocator`
        its ``resolve`` uses, so that block-by-block conversion can feed it a
        block at a time and rank the layers by their output sensitivity
        (``reparam.sensitivity``). None (the default) for every other config."""
        return None

    def check_layer(self, name: str, in_features: int, out_features: int) -> None:
        """Raise :class:`ConfigError` if this config cannot apply to a layer of this shape."""

    def check_weight(self, name: str, weight: torch.Tensor) -> None:
        """Raise :class:`ConfigError` if this config cannot apply to this weight
        (called by ``convert`` during validation, before anything changes)."""

    def resolve(self, layers: Mapping[str, tuple[nn.Module, LayerStats | None]], *,
                progress: bool = False) -> dict[str, "MethodConfig"]:
        """Per-layer configs for all layers one rule selected, given their statistics.

        Called once per rule, after calibration and before any swap, for
        decisions that span layers. The configs returned are what each module
        stores and what ``save`` writes, so ``load`` never needs statistics.
        Default: this config for all, or, for a config with an
        :meth:`allocator`, each layer's choice under its size budget.
        """
        allocator = self.allocator({name: module for name, (module, _) in layers.items()})
        if allocator is None:
            return {name: self for name in layers}
        from .budget import allocate  # core.budget builds on this module
        return allocate(layers, allocator, progress=progress)

    def fitting_cost(self, in_features: int, out_features: int) -> float:
        """Relative time to fit a layer of this shape with calibration data, for
        spreading layers over the ranks of a distributed conversion. Default: the
        whitened factorizations' (in × in) work per output row, in²·(in + out)."""
        return float(in_features) * in_features * (in_features + out_features)

    def cheap(self) -> "MethodConfig":
        """A faster variant whose fit ranks like this one's (e.g. round-to-nearest
        for GPTQ), used by the size-budget allocator (``core.budget``) to score candidates."""
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "MethodConfig":
        values = {k: v for k, v in values.items() if k != "method"}
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ConfigError(
                f"unknown key(s) {unknown} for method '{cls.method}'; "
                f"valid keys are {cls.field_names()}"
            )
        return cls(**values)

    def replace(self, **changes: Any) -> "MethodConfig":
        return dataclasses.replace(self, **changes)


def check_choice(method: str, key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{method}: {key}={value!r} is not one of {list(choices)}")


def check_flag(method: str, key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{method}: {key}={value!r} must be true or false")


def check_range(method: str, key: str, value: Any, low: float, high: float, *,
                low_open: bool = False) -> None:
    """Check ``low <(=) value <= high``; booleans are not numbers here."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ConfigError(f"{method}: {key}={value!r} must be a number in {bracket}{low}, {high}]")


def check_budget(method: str, size_ratio: float | None, explicit: dict[str, Any]) -> None:
    """Exactly one of ``size_ratio`` or the explicit size fields must be set."""
    given = [k for k, v in explicit.items() if v is not None]
    if size_ratio is None and not given:
        raise ConfigError(f"{method}: set size_ratio (fraction of dense bytes kept) or {list(explicit)}")
    if size_ratio is not None and given:
        raise ConfigError(f"{method}: set either size_ratio or {given}, not both")
    if size_ratio is not None:
        check_range(method, "size_ratio", size_ratio, 0.0, 1.0, low_open=True)
    for key in given:
        value = explicit[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{method}: {key}={value!r} must be a positive integer")
