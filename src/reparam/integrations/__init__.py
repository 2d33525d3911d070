"""Integrations with other libraries, each in a module of its own that imports
its library (``reparam.integrations.hf`` imports transformers). This package
imports none of them, so ``import reparam`` stays light: what lives here only
decides *when* an integration module is worth importing.

Hugging Face (see docs/huggingface.md), registered with transformers' quantizer
registry as soon as the earlier of these happens:

- ``import reparam`` when ``transformers.quantizers.auto`` (the registry) is
  already imported: at once;
- otherwise, the moment transformers imports that registry module itself
  (``from_pretrained`` and ``save_pretrained`` both do): a one-shot import
  hook on that single module name runs the registration right after it;
- ``reparam.convert``/``reparam.load`` finishing on a ``PreTrainedModel``
  (transformers is imported then anyway), which also marks the model so that
  ``save_pretrained`` writes the compressed checkpoint;
- an explicit ``reparam.integrations.hf.register()``.
"""
from __future__ import annotations

import importlib.abc
import sys
import warnings
from typing import Callable

from torch import nn

_HF_REGISTRY = "transformers.quantizers.auto"
_HF_MODEL_MODULE = "transformers.modeling_utils"


def register_hf_when_imported() -> None:
    """Register with transformers now if its quantizer registry is loaded, else right after it loads."""
    if _HF_REGISTRY in sys.modules:
        _register_hf()
    elif not any(isinstance(f, _AfterImport) and f.name == _HF_REGISTRY for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(_HF_REGISTRY, _register_hf))


def converted(model: nn.Module) -> None:
    """Called when ``convert``/``load`` finish on ``model``: a transformers
    model gets marked so that its own ``save_pretrained`` writes the
    compressed checkpoint. Imports nothing unless ``model`` is one."""
    modeling = sys.modules.get(_HF_MODEL_MODULE)  # a PreTrainedModel implies this module is loaded
    if modeling is not None and isinstance(model, modeling.PreTrainedModel):
        from . import hf

        hf.attach(model)


def _register_hf() -> None:
    try:
        from . import hf

        hf.register()
    except Exception as err:  # never break the user's import of transformers
        warnings.warn(f"reparam could not register with transformers ({type(err).__name__}: {err}); "
                      "save_pretrained/from_pretrained of reparam models will not work until "
                      "reparam.integrations.hf.register() succeeds", stacklevel=2)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``callback`` once, right after module ``name`` has executed.

    A finder at the front of ``sys.meta_path`` that answers only for ``name``:
    it takes the real spec from the other finders and wraps its loader. It
    leaves ``sys.meta_path`` once the module has run (a ``find_spec`` that
    imports nothing keeps it waiting), so it costs one string comparison per
    import until then and nothing after.
    """

    def __init__(self, name: str, callback: Callable[[], None]):
        self.name = name
        self.callback = callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        spec = next((found for finder in sys.meta_path if finder is not self and hasattr(finder, "find_spec")
                     if (found := finder.find_spec(fullname, path, target)) is not None), None)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenCall(spec.loader, self._fire)
        return spec

    def _fire(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)
            self.callback()


class _ThenCall(importlib.abc.Loader):
    """A module loader that calls ``after()`` once the module has executed."""

    def __init__(self, loader: importlib.abc.Loader, after: Callable[[], None]):
        self._loader = loader
        self._after = after

    def __getattr__(self, attribute):
        # get_source, get_filename, ... of the real loader, for tracebacks and inspect
        return getattr(self._loader, attribute)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        self._after()
