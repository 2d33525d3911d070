"""Named method configs, usable wherever a recipe takes a config:
``{"Linear": "w4-gptq"}`` or ``{"targets": ["Linear"], "method": "shift_add-3bit"}``.

Each is a plain config dict; docs/which_method.md gives what each measured on
MiniLM and SmolLM2. ``W4A16`` is llm-compressor's name for the same 4-bit
weight-only scheme (symmetric, groups of 128, GPTQ with calibration data).
"""
from __future__ import annotations

from typing import Any

from .core.config import ConfigError
from .core.registry import known_methods

PRESETS: dict[str, dict[str, Any]] = {
    "shift_add-2bit": {"method": "shift_add", "bits": 2},
    "shift_add-3bit": {"method": "shift_add", "bits": 3},
    "shift_add-4bit": {"method": "shift_add", "bits": 4},
    "w3-gptq": {"method": "affine", "bits": 3, "fit": "gptq"},
    "w4-gptq": {"method": "affine", "bits": 4, "fit": "gptq"},
    "w4-rtn": {"method": "affine", "bits": 4, "fit": "rtn"},
    "W4A16": {"method": "affine", "bits": 4, "symmetric": True, "group_size": 128, "fit": "gptq"},
    "low_rank-0.5": {"method": "low_rank", "size_ratio": 0.5},
    "dense_sparse-0.5": {"method": "dense_sparse", "size_ratio": 0.5},
    "auto-3bit": {"method": "auto", "target_bits": 3.0},
}


def preset(name: str) -> dict[str, Any]:
    """The config dict of a named preset."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets are {sorted(PRESETS)}; or give a config dict "
                          f"with a 'method' key, one of {known_methods()}")
    return dict(PRESETS[name])
