"""Module swaps that can be undone exactly: the all-or-nothing part of
``convert`` and ``load``."""
from __future__ import annotations

from typing import Callable

from torch import nn

from .core.registry import Method


class ModuleSwaps:
    """Replace or change submodules of ``model``; if the ``with`` block raises
    (Ctrl-C included), every swap is undone in reverse order and the model is
    as it was. On success each new module takes its predecessor's train/eval flag."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._done: list[tuple[str, nn.Module, nn.Module, Method, dict | None]] = []

    def __enter__(self) -> "ModuleSwaps":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.undo()
        else:
            for _name, old, new, _method, _saved in self._done:
                new.train(old.training)  # also sets the flag of a parametrization's new submodules
        self._done.clear()  # release the originals once the swaps are final

    def swap(self, name: str, method: Method, build: Callable[[nn.Module], nn.Module],
             aliases: tuple[str, ...] = ()) -> nn.Module:
        """``build(old)`` returns a new module to put at ``name``, or ``old`` changed in place.

        ``aliases``: other names the same module is registered under; they get the new module too.
        """
        old = self.model.get_submodule(name)
        # In-place methods (parametrizations) rewrite the module's tensors;
        # keep them so that undo restores the exact values, not a round trip.
        saved = {k: v.clone() for k, v in old.state_dict().items()} if method.undo else None
        new = build(old)
        for where in (name, *aliases):
            if new is not old:
                _set_submodule(self.model, where, new)
            self._done.append((where, old, new, method, saved if where == name else None))
        return new

    def undo(self) -> None:
        for name, old, new, method, saved in reversed(self._done):
            if new is old and saved is None:
                continue  # an alias of a module changed in place: undone under its first name
            if new is old:
                method.undo(old)
                old.load_state_dict(saved)
                # Removing a parametrization re-registers the tensor last; keep the original order.
                params = old._parameters
                old._parameters = {**{k: params[k] for k in saved if k in params},
                                   **{k: v for k, v in params.items() if k not in saved}}
            else:
                _set_submodule(self.model, name, old)
        self._done.clear()


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
