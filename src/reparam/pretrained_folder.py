"""Reading a folder written by a converted transformers model's
``save_pretrained`` (``reparam.integrations.hf``) for ``reparam.load``:
the recipe from ``config.json``'s ``quantization_config``, the tensors from
``model.safetensors`` or the shards its index names. Needs no transformers.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .core.config import MethodConfig
from .file_checks import FileFormatError, check_targets, read_recipe

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def read_folder(model: nn.Module, folder: str) -> tuple[dict[str, MethodConfig], dict[str, torch.Tensor]]:
    """``({module name: config}, state)`` of the folder; tensors save_pretrained
    left out because they are tied in ``model`` (a tied lm_head) are filled in
    from the tensor they share, as ``reparam.save``'s aliases are."""
    modules = read_recipe(_recipe_metadata(folder), os.path.join(folder, "config.json"))
    check_targets(model, modules, folder)
    state: dict[str, torch.Tensor] = {}
    for name in _weight_files(folder):
        path = os.path.join(folder, name)
        try:
            with safe_open(path, framework="pt") as file:
                state.update((key, file.get_tensor(key)) for key in file.keys())
        except (SafetensorError, OSError) as err:
            raise FileFormatError(f"{path} is not a readable safetensors file (damaged or truncated?): {err}") from err
    state.update({key: state[kept] for key, kept in _tied(model, state).items()})
    return modules, state


def _recipe_metadata(folder: str) -> dict[str, str]:
    """config.json's quantization_config as the metadata strings ``read_recipe`` checks."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as file:
            config = json.load(file)
    except (OSError, ValueError) as err:
        raise FileFormatError(f"{folder} is a folder but has no readable config.json ({err}); reparam.load takes "
                              "a file written by reparam.save or a folder written by save_pretrained") from err
    recipe = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(recipe, dict) or recipe.get("quant_method") != "reparam":
        raise FileFormatError(f"{path} has no reparam quantization_config: the folder was not saved from a "
                              "converted model (reparam.convert, then save_pretrained)")
    return {"reparam.format": str(recipe.get("format_version")), "reparam.modules": json.dumps(recipe.get("modules"))}


def _weight_files(folder: str) -> list[str]:
    index = os.path.join(folder, INDEX)
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as file:
                return sorted(set(json.load(file)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise FileFormatError(f"{index} is damaged: {err!r}") from err
    if not os.path.exists(os.path.join(folder, SINGLE)):
        raise FileFormatError(f"{folder} holds neither {SINGLE} nor {INDEX}; save it with save_pretrained "
                              "(safetensors, the default)")
    return [SINGLE]


def _tied(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{missing key: stored key}`` for names under which the model holds a stored tensor's object."""
    names: dict[int, list[str]] = {}
    for name, tensor in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)):
        names.setdefault(id(tensor), []).append(name)
    tied = {}
    for group in names.values():
        kept = next((name for name in group if name in state), None)
        tied.update({name: kept for name in group if kept is not None and name not in state})
    return tied
