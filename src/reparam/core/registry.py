"""Method name → config class and handlers. ``convert``, ``save`` and ``load``
talk only to this registry, never to a method by name.

A method lives in one file of ``reparam.methods``; every file there is
imported on first use, so adding a method means adding that file."""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .config import ConfigError, MethodConfig
from .module import ReparamModule, is_conv1d
from .stats import LayerStats

Apply = Callable[[nn.Module, MethodConfig, "LayerStats | None"], nn.Module]


@dataclasses.dataclass(frozen=True)
class Method:
    """How one method turns a module into its reparameterized form.

    ``apply`` fits (may use statistics); ``restore`` only rebuilds the
    structure, for ``load``. A handler either returns a new module (the caller
    swaps it in) or returns the same module changed in place, in which case
    ``undo`` must put it back exactly as it was. ``check_state(module,
    state)``, if set, raises ``ValueError`` when tensors about to be loaded
    into the restored ``module`` (its own keys) hold values it cannot use.
    """

    name: str
    config: type[MethodConfig]
    targets: tuple[type[nn.Module], ...]
    apply: Apply
    restore: Callable[[nn.Module, MethodConfig], nn.Module]
    undo: Callable[[nn.Module], None] | None = None
    # Also takes transformers' Conv1D (a Linear with its weight stored (in, out));
    # matched by class name, so transformers is never imported here.
    conv1d: bool = False
    check_state: Callable[[nn.Module, Mapping[str, torch.Tensor]], None] | None = None
    # Where each tensor of the fitted module holds the output rows, when its
    # fit treats rows independently (``ReparamModule.ROW_DIMS``); None: it does not.
    row_dims: Mapping[str, int] | None = dataclasses.field(default=None, hash=False)  # a dict: not hashable

    def supports(self, module: nn.Module) -> bool:
        # Exact types only, so a converted wrapper or a subclass with its own
        # forward is never mistaken for the plain layer it resembles.
        return type(module) in self.targets or (self.conv1d and is_conv1d(module))

    @property
    def target_names(self) -> list[str]:
        return [t.__name__ for t in self.targets] + (["Conv1D"] if self.conv1d else [])


_METHODS: dict[str, Method] = {}
_discovered = False


def register(method: Method) -> Method:
    if method.config.method != method.name:
        raise ValueError(f"{method.config.__name__}.method is '{method.config.method}', "
                         f"registered as '{method.name}'")
    if method.name in _METHODS and _METHODS[method.name] != method:
        raise ValueError(f"method '{method.name}' is already registered")
    _METHODS[method.name] = method
    return method


def register_wrapper(config: type[MethodConfig], targets: tuple[type[nn.Module], ...] = (nn.Linear,)):
    """Class decorator registering a :class:`ReparamModule` under ``config.method``;
    it takes ``targets`` and transformers' ``Conv1D``."""
    def decorate(cls: type[ReparamModule]) -> type[ReparamModule]:
        register(Method(config.method, config, targets, apply=cls.from_linear, restore=cls.empty_like,
                        conv1d=True, check_state=cls.check_state, row_dims=cls.ROW_DIMS))
        return cls
    return decorate


def _discover() -> None:
    global _discovered
    if not _discovered:
        _discovered = True
        package = importlib.import_module("reparam.methods")
        for info in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"reparam.methods.{info.name}")


def module_config(module: nn.Module) -> MethodConfig | None:
    """The config a module was reparameterized with, or None.

    Wrappers hold it as ``config``; methods that change a module in place
    (parametrizations) set ``module.reparam_config`` and their ``undo`` removes it.
    """
    if isinstance(module, ReparamModule):
        return module.config
    config = getattr(module, "reparam_config", None)
    return config if isinstance(config, MethodConfig) else None


def known_methods() -> list[str]:
    _discover()
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    _discover()
    if name not in _METHODS:
        raise ConfigError(f"unknown method '{name}'; known methods are {known_methods()}")
    return _METHODS[name]


def parse_config(value: MethodConfig | Mapping[str, Any]) -> MethodConfig:
    """A config object, or a dict with a ``method`` key, as a checked config object."""
    if isinstance(value, MethodConfig):
        get_method(value.method)
        return value
    if not isinstance(value, Mapping) or "method" not in value:
        raise ConfigError(f"a method config must be a dict with a 'method' key or a config object, "
                          f"got {value!r}; known methods are {known_methods()}")
    method = get_method(value["method"])
    try:
        return method.config.from_dict(value)
    except TypeError as err:  # a wrong value type that __post_init__ did not catch
        raise ConfigError(f"{method.name}: {err}; valid keys are {method.config.field_names()}") from err
