"""Module swaps that can be undone exactly: the all-or-nothing part of
``convert`` and ``load``."""
from __future__ import annotations

import dataclasses
from typing import Callable

from torch import nn

from .core.registry import Method
from .spill import Spill, Spilled, storages


@dataclasses.dataclass
class _Swap:
    name: str
    old: nn.Module
    new: nn.Module
    method: Method
    saved: dict | None  # an in-place method's original state, under the module's first name only
    spilled: Spilled | None = None  # ``old``'s tensors moved to disk, under the module's last name only


class ModuleSwaps:
    """Replace or change submodules of ``model``; if the ``with`` block raises
    (Ctrl-C included), every swap is undone in reverse order and the model is
    as it was. On success each new module takes its predecessor's train/eval flag.

    ``spill``: the tensors of a replaced module that nothing else still uses
    (tied weights and aliases stay) are moved to a temporary file
    (``reparam.spill``) and freed, so originals and replacements are not held
    in memory together; undo reads them back into the same tensor objects.
    The file is deleted when the block ends, whatever happens.
    """

    def __init__(self, model: nn.Module, *, spill: bool = False):
        self.model = model
        self._done: list[_Swap] = []
        self._spill = Spill() if spill else None

    def __enter__(self) -> "ModuleSwaps":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.undo()
            return
        for swap in self._done:
            swap.new.train(swap.old.training)  # also sets the flag of a parametrization's new submodules
        self._release()  # the originals go once the swaps are final

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
            self._done.append(_Swap(where, old, new, method, saved if where == name else None))
        if new is not old and self._spill is not None:
            # Storages still in use: the model's (``new`` may reuse a bias) and earlier originals'.
            keep = storages(self.model).union(*(storages(s.old) for s in self._done if s.old is not old))
            spilled = self._done[-1].spilled = self._spill.write(old, keep)
            if spilled is not None:
                spilled.free()  # only once undo knows where the values are
        return new

    def undo(self) -> None:
        """Put every original back (reading spilled tensors from disk), newest first.

        A spilled module whose tensors cannot be read back is still put back,
        the other swaps are still undone, and a RuntimeError then names it.
        """
        unreadable: list[tuple[str, Exception]] = []
        try:
            for swap in reversed(self._done):
                if swap.new is swap.old:
                    if swap.saved is not None:  # None: an alias of an in-place change, undone under its first name
                        _restore_in_place(swap.old, swap.method, swap.saved)
                    continue
                _set_submodule(self.model, swap.name, swap.old)
                if swap.spilled is not None:
                    try:
                        swap.spilled.load()
                    except Exception as err:  # any error: reported below, once every other swap is undone
                        unreadable.append((swap.name, err))
        finally:
            self._release()
        if unreadable:
            name, err = unreadable[0]
            raise RuntimeError(f"the conversion failed and the original tensors of {len(unreadable)} module(s), "
                               f"e.g. {name!r}, could not be read back from the temporary file ({err}); those "
                               "modules are back in the model but empty: reload the model") from err

    def _release(self) -> None:
        self._done.clear()
        if self._spill is not None:
            self._spill.close()


def _restore_in_place(module: nn.Module, method: Method, saved: dict) -> None:
    method.undo(module)
    module.load_state_dict(saved)
    # Removing a parametrization re-registers the tensor last; keep the original order.
    params = module._parameters
    module._parameters = {**{k: params[k] for k in saved if k in params},
                          **{k: v for k, v in params.items() if k not in saved}}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
