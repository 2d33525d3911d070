"""Bake training-time reparameterizations into plain weights for inference."""
from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

from .core.registry import module_config


def fold(model: nn.Module) -> list[str]:
    """Replace every parametrized weight (compander, scale vectors) by its
    current value, leaving plain ``nn.Linear``/``nn.Conv*``/``nn.LayerNorm``
    modules that compute the same outputs. Returns the folded module names.

    For scale vectors this is the RepQ-ViT algebra: diag(u)·W·diag(v) becomes
    one matrix, and a norm's m·d/‖d‖ becomes its plain γ.
    """
    folded = []
    for name, module in model.named_modules():
        config = module_config(module)
        if config is not None and parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            del module.reparam_config
            folded.append(name)
    return folded
