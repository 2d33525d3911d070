"""Everything ``reparam.load`` checks before it changes a model.

A saved file is untrusted input: its metadata may be damaged, hand-edited or
written by something else, and its tensors may hold values that would make a
layer silently wrong (NaN scales, indices past the dictionary). Each check
raises :class:`FileFormatError` naming the file, what is wrong, and whether
the file is damaged or meant for another architecture.
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import BinaryIO, Mapping

import torch
from torch import nn

from .core.config import ConfigError, MethodConfig
from .core.module import linear_shape
from .core.registry import get_method, parse_config

FORMAT_VERSION = 1
CHECKSUM_KEY = "reparam.sha256"


class FileFormatError(ValueError):
    """A file ``reparam.load`` cannot use: not written by ``reparam.save``,
    damaged, or written for another architecture. The model is unchanged."""


def check_model(model: nn.Module) -> None:
    """Refuse a model whose non-persistent buffers are on the meta device.

    The file cannot hold them (they are not in the state dict), so after the
    load they would stay on meta and every output would be NaN or garbage.
    ``accelerate.init_empty_weights()`` puts only parameters on meta and keeps
    buffers real, which is what ``load`` needs.
    """
    persistent = set(model.state_dict())
    lost = [name for name, buffer in model.named_buffers()
            if buffer.device.type == "meta" and name not in persistent]
    if lost:
        raise ValueError(
            f"the model's non-persistent buffers {lost[:5]} are on the meta device; a file cannot hold them, "
            "so they would stay uninitialized. Build the model under accelerate.init_empty_weights() (which "
            "keeps buffers real) instead of torch.device('meta'), or on CPU")


def data_checksum(file: BinaryIO, start: int) -> str:
    """SHA-256 (hex) of everything in ``file`` from byte ``start`` on: a safetensors data section."""
    file.seek(start)
    digest = hashlib.sha256()
    while chunk := file.read(1 << 24):
        digest.update(chunk)
    return digest.hexdigest()


def check_checksum(metadata: Mapping[str, str], path: str) -> None:
    """The data section matches the checksum ``save`` wrote (files without one are not checked)."""
    expected = metadata.get(CHECKSUM_KEY)
    if expected is None:
        return
    with open(path, "rb") as file:
        actual = data_checksum(file, 8 + int.from_bytes(file.read(8), "little"))
    if actual != expected:
        raise _damaged(path, f"its tensor data does not match the SHA-256 saved with it ({actual[:12]}… "
                             f"instead of {expected[:12]}…); a byte changed after saving")


def _damaged(path: str, what: str) -> FileFormatError:
    return FileFormatError(f"{path} is damaged or not a reparam file: {what}")


def _json(metadata: Mapping[str, str], key: str, path: str) -> dict:
    try:
        value = json.loads(metadata[key])
    except KeyError:
        raise _damaged(path, f"its metadata has no '{key}'") from None
    except json.JSONDecodeError as err:
        raise _damaged(path, f"metadata '{key}' is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise _damaged(path, f"metadata '{key}' must be a JSON object, got {type(value).__name__}")
    return value


def read_recipe(metadata: Mapping[str, str], path: str) -> dict[str, MethodConfig]:
    """The format version, checked, and ``{module name: config}`` from the metadata."""
    version = metadata.get("reparam.format")
    if version is None:
        raise FileFormatError(f"{path} was not written by reparam.save (no 'reparam.format' metadata); "
                              "for a file written by save_pretrained, pass its folder")
    if not re.fullmatch(r"[1-9][0-9]{0,8}", version):
        raise _damaged(path, f"format version {version!r} is not a positive integer")
    if int(version) > FORMAT_VERSION:
        raise FileFormatError(f"{path}: file format version {version} is newer than this reparam's "
                              f"{FORMAT_VERSION}; upgrade reparam to load it")
    modules = {}
    for name, values in _json(metadata, "reparam.modules", path).items():
        if not isinstance(values, dict) or not isinstance(values.get("method"), str):
            raise _damaged(path, f"module '{name}' has config {values!r}, not an object with a 'method' name")
        try:
            modules[name] = parse_config(values)
        except (ConfigError, TypeError) as err:
            raise _damaged(path, f"module '{name}': {err}") from None
    return modules


def read_aliases(metadata: Mapping[str, str], keys: set[str], path: str) -> dict[str, str]:
    """``{key: kept key}`` for tied tensors, each pointing at a tensor the file holds."""
    aliases = _json(metadata, "reparam.aliases", path)
    for key, kept in aliases.items():
        if not isinstance(kept, str) or kept not in keys:
            raise _damaged(path, f"alias '{key}' points at {kept!r}, which the file does not hold")
        if key in keys:
            raise _damaged(path, f"'{key}' is both stored and an alias of '{kept}'")
    return aliases


def check_targets(model: nn.Module, modules: Mapping[str, MethodConfig], path: str = "the checkpoint") -> None:
    """Every module the file converts exists here, has a type its method
    supports, and a shape its config fits (before anything is allocated)."""
    names = dict(model.named_modules())
    for name, config in modules.items():
        method = get_method(config.method)
        if name == "":
            raise _damaged(path, "it converts the root module ''; reparam converts submodules only")
        if name not in names:
            raise FileFormatError(f"{path} converts module '{name}', which this model does not have; "
                                  "load into a model of the architecture that was saved")
        module = names[name]
        if not method.supports(module):
            raise FileFormatError(f"{path} converts '{name}' with '{method.name}', which supports "
                                  f"{method.target_names}, but here it is a {type(module).__name__}")
        weight = getattr(module, "weight", None)
        if weight is None:
            raise FileFormatError(f"{path} converts '{name}', which has no weight in this model")
        try:
            config.check_layer(name, *linear_shape(module))  # as convert sees it (Conv1D transposed, a norm's in is 1)
        except ConfigError as err:
            raise FileFormatError(f"{path} does not fit this model: {err}") from None


def check_state(model: nn.Module, state: Mapping[str, torch.Tensor], path: str) -> None:
    """The file's tensors are exactly the (rebuilt) model's keys, shapes and dtypes.

    A dtype mismatch is refused, never cast: casting would silently change
    values (float64 codes 300 → uint8 44, −1 → 255).
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise FileFormatError(f"{path} does not match the model: missing keys {missing[:5]}, "
                              f"unexpected keys {extra[:5]}; load into the architecture that was saved")
    for key, tensor in expected.items():
        if tensor.shape != state[key].shape:
            raise FileFormatError(f"{path} does not match the model: '{key}' has shape "
                                  f"{tuple(state[key].shape)} in the file and {tuple(tensor.shape)} in the model")
        if tensor.dtype != state[key].dtype:
            raise FileFormatError(
                f"{path} does not match the model: '{key}' is {state[key].dtype} in the file and "
                f"{tensor.dtype} in the model; load never casts: build the model in the dtype it was saved in")


def check_values(model: nn.Module, modules: Mapping[str, MethodConfig], state: Mapping[str, torch.Tensor],
                 path: str) -> None:
    """The values of every converted module's tensors: finite, and whatever
    its method checks (``Method.check_state``: indices in range, scales in range)."""
    for name, config in modules.items():
        prefix = name + "."
        local = {key[len(prefix):]: tensor for key, tensor in state.items() if key.startswith(prefix)}
        for key, tensor in local.items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise _damaged(path, f"'{prefix}{key}' holds NaN or Inf")
        method = get_method(config.method)
        if method.check_state is not None:
            try:
                method.check_state(model.get_submodule(name), local)
            except ValueError as err:
                raise _damaged(path, f"module '{name}' ({method.name}): {err}") from None
