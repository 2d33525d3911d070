"""Hugging Face transformers round trip through transformers' own extension
point for third-party quantization methods (``register_quantization_config``,
``register_quantizer``, an ``HfQuantizer``), the way torchao and
compressed-tensors plug in:

    reparam.convert(model, recipe)             # model: a transformers PreTrainedModel
    model.save_pretrained(folder)              # compressed safetensors + quantization_config
    AutoModelForCausalLM.from_pretrained(folder)  # converted modules rebuilt, tensors loaded

``config.json`` gets ``quantization_config = {"quant_method": "reparam",
"format_version": 1, "modules": {module name: config dict}}``: the recipe as
applied, one resolved config per converted module. Loading swaps those
modules into the empty (meta-device) model with each method's ``restore``
before transformers reads the weights, so nothing is refitted and no dense
base model is needed. When this module gets imported: see
:mod:`reparam.integrations`. Importing it imports transformers.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Iterable

from torch import nn
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..core.config import MethodConfig
from ..core.module import ReparamModule
from ..core.registry import get_method, parse_config
from ..fold import fold
from ..file_checks import FORMAT_VERSION, check_targets  # the checks reparam.load makes
from ..io import converted_modules
from ..swap import ModuleSwaps

if TYPE_CHECKING:  # at registration time transformers.modeling_utils may still be importing
    from transformers.modeling_utils import PreTrainedModel

QUANT_METHOD = "reparam"
# Loaded as plain dense weights (GGUF is dequantized by from_pretrained): a converted model is a reparam model.
DEQUANTIZED_ON_LOAD = ("gguf",)


class ReparamQuantizationConfig(QuantizationConfigMixin):
    """transformers' record of a converted model: ``modules`` maps each
    converted module's name to its resolved config dict; ``format_version``
    is the version of the modules' state-dict layout (``reparam.io.FORMAT_VERSION``).

    Built by :func:`attach` from the model; read back from ``config.json`` by
    ``from_pretrained``. Every config is checked on construction, so an
    unknown method or a newer format fails before any weight is read.
    """

    def __init__(self, modules: dict[str, dict[str, Any]], format_version: int = FORMAT_VERSION,
                 quant_method: str = QUANT_METHOD):
        if quant_method != QUANT_METHOD:
            raise ValueError(f"a ReparamQuantizationConfig needs quant_method '{QUANT_METHOD}', got '{quant_method}'")
        if format_version > FORMAT_VERSION:
            raise ValueError(f"this checkpoint's reparam format version {format_version!r} is newer than this "
                             f"reparam's {FORMAT_VERSION}; upgrade reparam to load it")
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.modules = {name: parse_config(config).to_dict() for name, config in modules.items()}

    @classmethod
    def from_model(cls, model: nn.Module) -> "ReparamQuantizationConfig":
        return cls({name: config.to_dict() for name, config in converted_modules(model).items()})

    def module_configs(self) -> dict[str, MethodConfig]:
        return {name: parse_config(config) for name, config in self.modules.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": self.quant_method, "format_version": self.format_version,
                "modules": {name: dict(config) for name, config in self.modules.items()}}


class ReparamHfQuantizer(HfQuantizer):
    """Rebuilds a reparam checkpoint's converted modules before transformers loads its weights.

    Loads only checkpoints written by ``save_pretrained`` of a converted model
    (``requires_calibration``): reparam does not convert on load, since its
    fits want calibration data and a recipe; run ``reparam.convert`` instead.
    """

    requires_calibration = True

    def _process_model_before_weight_loading(self, model: PreTrainedModel, **kwargs) -> PreTrainedModel:
        # The model is an empty skeleton here (on the meta device): restore only builds structure.
        configs = self.quantization_config.module_configs()
        check_targets(model, configs, "config.json's quantization_config")
        with ModuleSwaps(model) as swaps:
            for name, config in configs.items():
                method = get_method(config.method)
                swaps.swap(name, method, lambda old: method.restore(old, config))
        _untie(model, configs)
        return model

    def get_state_dict_and_metadata(self, model: PreTrainedModel):
        """Called first thing by ``save_pretrained``: record the modules as they are
        now (a later ``convert`` or ``fold`` changed them) into ``config.json``."""
        self.quantization_config = ReparamQuantizationConfig.from_model(model)
        model.config.quantization_config = self.quantization_config
        return None, {}

    def _dequantize(self, model: PreTrainedModel, dtype=None) -> PreTrainedModel:
        """``model.dequantize()``: every converted layer baked back into a plain one
        (``ReparamModule.to_linear``, :func:`reparam.fold`); transformers then drops the marks."""
        fold(model)
        for name, module in list(model.named_modules()):
            if isinstance(module, ReparamModule):
                model.set_submodule(name, module.to_linear())
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        # Factors, scales and biases are parameters or buffers of plain torch modules.
        return True

    @property
    def is_qat_trainable(self) -> bool:
        # transformers' Trainer refuses a quantized model without adapters unless this is True;
        # reparam models train as they are (compander and scale_vector exist for training).
        return True

    @property
    def is_compileable(self) -> bool:
        return True


def register() -> None:
    """Register ``quant_method="reparam"`` with transformers (idempotent).

    Needed before ``from_pretrained`` of a reparam checkpoint; ``import
    reparam`` arranges it by itself (see :mod:`reparam.integrations`).
    """
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(ReparamQuantizationConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(ReparamHfQuantizer)


def attach(model: PreTrainedModel) -> None:
    """Mark a converted transformers model as a reparam model, so that its
    ``save_pretrained`` writes the compressed tensors and the recipe, as a model
    loaded by ``from_pretrained`` already is. ``convert`` and ``load`` call it."""
    register()
    config = ReparamQuantizationConfig.from_model(model)
    if not config.modules:
        return  # nothing converted (e.g. a recipe of None rules): the model stays a plain one
    other = getattr(model, "hf_quantizer", None)
    if other is not None and not isinstance(other, ReparamHfQuantizer) and other.quantization_config.quant_method \
            not in DEQUANTIZED_ON_LOAD:
        method = other.quantization_config.quant_method
        warnings.warn(f"this model is also quantized with '{method}': its config.json can record one method "
                      f"only, so from_pretrained of what save_pretrained writes would not rebuild the reparam "
                      f"layers. Save it with reparam.save, or convert a model loaded without '{method}'",
                      stacklevel=4)
        return
    _untie(model, config.modules)
    model.config.quantization_config = config
    model.hf_quantizer = ReparamHfQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD


def _untie(model: PreTrainedModel, converted: Iterable[str]) -> None:
    """Drop the weight ties that involve a converted module (e.g. a compressed
    ``lm_head`` tied to the input embedding): its weight is its own θ now, and
    transformers would otherwise tie a dense tensor onto it when loading."""
    prefixes = tuple(f"{name}." for name in converted)
    ties = getattr(model, "all_tied_weights_keys", None) or {}
    for target, source in list(ties.items()):
        if target.startswith(prefixes) or source.startswith(prefixes):
            del ties[target]
