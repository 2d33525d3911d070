"""reparam: drop-in weight reparameterization modules for PyTorch.

>>> import reparam
>>> report = reparam.convert(model, {"encoder.*": {"method": "low_rank", "size_ratio": 0.5}}, calib=batches)
>>> print(report)
>>> reparam.save(model, "model.safetensors")
>>> reparam.load(build_model(), "model.safetensors")
"""
from . import integrations
from .calibration import collect_stats
from .convert import apply, convert, plan_conversion
from .core import (ConfigError, Factorizer, LayerStats, MethodConfig, Quantizer, ReparamModule,
                   get_method, known_methods)
from . import optim
from .fold import fold
from .io import FileFormatError, converted_modules, load, save
from .methods.affine import AffineConfig, AffineLinear
from .methods.auto import AutoConfig
from .methods.compander import CompanderConfig
from .methods.dense_sparse import DenseSparseConfig, DenseSparseLinear
from .methods.low_rank import LowRankConfig, LowRankLinear
from .methods.qera import QeraConfig, QeraLinear
from .methods.quantized_low_rank import QuantizedLowRankConfig, QuantizedLowRankLinear
from .methods.scale_vector import ScaleVectorConfig
from .methods.shift_add import ShiftAddConfig, ShiftAddLinear
from .recipe import parse_recipe
from .report import ConversionReport, LayerReport
from .tuning import BlockTuning

__version__ = "0.1.0"

integrations.register_hf_when_imported()  # see reparam.integrations: transformers is never imported here

__all__ = [
    "AffineConfig", "AffineLinear", "BlockTuning", "CompanderConfig", "DenseSparseConfig", "DenseSparseLinear", "ConfigError", "ConversionReport", "Factorizer", "FileFormatError", "LayerReport", "LayerStats",
    "LowRankConfig", "LowRankLinear", "MethodConfig", "Quantizer", "ReparamModule", "ScaleVectorConfig", "ShiftAddConfig", "ShiftAddLinear",
    "apply", "collect_stats", "convert", "fold", "converted_modules", "get_method", "known_methods", "load",
    "optim", "parse_recipe", "plan_conversion", "save",
    "AutoConfig", "QeraConfig", "QeraLinear", "QuantizedLowRankConfig", "QuantizedLowRankLinear",
]
