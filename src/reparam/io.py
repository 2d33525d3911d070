"""Compressed save/load: one safetensors file, the recipe as applied in its metadata.

The file holds every tensor of the model's state dict, compressed tensors as
stored, so its size is the real size. Metadata (strings only, by the format):

- ``reparam.format``: the format version;
- ``reparam.modules``: JSON ``{module name: config dict}`` of each converted module;
- ``reparam.aliases``: JSON ``{key: kept key}`` for tensors sharing storage
  (tied weights), which safetensors stores once.

No pickle is read or written.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .core.config import MethodConfig
from .core.registry import get_method, module_config, parse_config
from .swap import ModuleSwaps

FORMAT_VERSION = 1


def converted_modules(model: nn.Module) -> dict[str, MethodConfig]:
    """Name -> config of every reparameterized module in ``model``, not counting
    the parts of a composed one (e.g. the quantized layer inside a ``qera`` layer)."""
    found: dict[str, MethodConfig] = {}
    for name, module in model.named_modules():  # parents come before their children
        if (config := module_config(module)) is not None and not name.startswith(tuple(f"{n}." for n in found)):
            found[name] = config
    return found


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model``'s tensors and its conversion recipe to a safetensors file."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, tensor in model.state_dict().items():
        if tensor.device.type == "meta":
            raise ValueError(f"cannot save '{key}': it is on the meta device (never loaded)")
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape,
                 tensor.stride(), tensor.dtype) if tensor.numel() else None
        if ident is not None and ident in seen:
            aliases[key] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = key
        tensors[key] = tensor.detach().to("cpu").contiguous()
    metadata = {
        "reparam.format": str(FORMAT_VERSION),
        "reparam.modules": json.dumps({n: c.to_dict() for n, c in converted_modules(model).items()}),
        "reparam.aliases": json.dumps(aliases),
    }
    save_file(_unshare(tensors), os.fspath(path), metadata=metadata)


def load(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Rebuild the converted modules of a freshly built ``model`` (on any device,
    the meta device included) from the file's recipe, then load every tensor.

    Nothing is refitted: loaded outputs equal the saved model's exactly. A file
    that does not match the model raises and leaves ``model`` as it was.
    """
    with safe_open(os.fspath(path), framework="pt") as file:
        metadata = file.metadata() or {}
        modules = _read_recipe(metadata)
        _check_targets(model, modules)
        aliases = json.loads(metadata.get("reparam.aliases", "{}"))
        with ModuleSwaps(model) as swaps:
            for name, config in modules.items():
                method = get_method(config.method)
                swaps.swap(name, method, lambda old: method.restore(old, config))
            state = {key: file.get_tensor(key) for key in file.keys()}
            state.update({key: state[kept] for key, kept in aliases.items()})
            _check_state(model, state, path)
            on_meta = any(t.device.type == "meta" for t in model.state_dict().values())
            model.load_state_dict(_matching_devices(model, state), strict=True, assign=on_meta)
    return model


def _read_recipe(metadata: dict[str, str]) -> dict[str, MethodConfig]:
    version = int(metadata.get("reparam.format", "0"))
    if version == 0:
        raise ValueError("this safetensors file was not written by reparam.save (no 'reparam.format' metadata)")
    if version > FORMAT_VERSION:
        raise ValueError(f"file format version {version} is newer than this reparam's "
                         f"{FORMAT_VERSION}; upgrade reparam to load it")
    return {name: parse_config(config) for name, config in json.loads(metadata["reparam.modules"]).items()}


def _check_targets(model: nn.Module, modules: dict[str, MethodConfig]) -> None:
    names = dict(model.named_modules())
    for name, config in modules.items():
        method = get_method(config.method)
        if name not in names:
            raise ValueError(f"the file converts module '{name}', which this model does not have; "
                             "load into a model of the architecture that was saved")
        if not method.supports(names[name]):
            raise ValueError(f"the file converts '{name}' with '{method.name}', which supports "
                             f"{method.target_names}, but here it is a {type(names[name]).__name__}")


def _check_state(model: nn.Module, state: dict[str, torch.Tensor], path: Any) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"{os.fspath(path)} does not match the model: missing keys {missing[:5]}, "
                         f"unexpected keys {extra[:5]}; load into the architecture that was saved")
    for key, tensor in expected.items():
        if tensor.shape != state[key].shape:
            raise ValueError(f"{os.fspath(path)} does not match the model: '{key}' has shape "
                             f"{tuple(state[key].shape)} in the file and {tuple(tensor.shape)} in the model")


def _matching_devices(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors on the device the model holds them on (the file is read to CPU)."""
    expected = model.state_dict()
    return {k: v if expected[k].device.type in ("cpu", "meta") else v.to(expected[k].device)
            for k, v in state.items()}


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses overlapping views of one storage; copy those apart."""
    storages: set[int] = set()
    out = {}
    for key, tensor in tensors.items():
        ptr = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if ptr in storages and tensor.numel() else tensor
        storages.add(ptr)
    return out

