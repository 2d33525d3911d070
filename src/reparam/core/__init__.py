"""The bases every method builds on."""
from .config import ConfigError, MethodConfig
from .factorizer import (ChannelScaling, Factorizer, Identity, InputSpace, Whitening, factor_budget,
                         rank_for_ratio)
from .module import ReparamModule, state_nbytes, state_numel
from .quantizer import Quantizer
from .registry import (Method, get_method, known_methods, module_config, parse_config, register,
                       register_wrapper)
from .stats import LayerStats

__all__ = [
    "ChannelScaling", "ConfigError", "Factorizer", "Identity", "InputSpace", "LayerStats", "Method", "MethodConfig", "Quantizer",
    "ReparamModule", "Whitening", "factor_budget", "get_method", "known_methods", "module_config", "parse_config",
    "rank_for_ratio", "register", "register_wrapper", "state_nbytes", "state_numel",
]
