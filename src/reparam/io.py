"""Compressed save/load: one safetensors file, the recipe as applied in its metadata.

The file holds every tensor of the model's state dict, compressed tensors as
stored, so its size is the real size. Metadata (strings only, by the format):

- ``reparam.format``: the format version;
- ``reparam.modules``: JSON ``{module name: config dict}`` of each converted module;
- ``reparam.aliases``: JSON ``{key: kept key}`` for tensors sharing storage
  (tied weights), which safetensors stores once;
- ``reparam.sha256``: the SHA-256 of the data section (every tensor's bytes),
  so a damaged byte anywhere is caught (checked when present).

Files are deterministic (the same model gives the same bytes, so a checksum
identifies a model) and written atomically (a failed save leaves no partial
file). Everything read is checked before the model changes (see
``reparam.file_checks``); no pickle is read or written.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from . import integrations
from .core.config import MethodConfig
from .core.registry import get_method, module_config
from .file_checks import (CHECKSUM_KEY, FORMAT_VERSION, FileFormatError, check_checksum, check_model, check_state,
                          check_targets, check_values, read_aliases, read_recipe)
from .pretrained_folder import read_folder
from .swap import ModuleSwaps

__all__ = ["FORMAT_VERSION", "FileFormatError", "converted_modules", "load", "save"]


def converted_modules(model: nn.Module) -> dict[str, MethodConfig]:
    """Name -> config of every reparameterized module in ``model``, not counting
    the parts of a composed one (e.g. the quantized layer inside a ``qera`` layer)."""
    found: dict[str, MethodConfig] = {}
    for name, module in model.named_modules():  # parents come before their children
        if (config := module_config(module)) is not None and not name.startswith(tuple(f"{n}." for n in found)):
            found[name] = config
    return found


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model``'s tensors and its conversion recipe to a safetensors file.

    The bytes depend only on the model (metadata keys are sorted), and the
    file appears only once complete (written beside ``path``, then renamed).
    In a distributed run (``torch.distributed`` initialized) only rank 0
    writes: after ``convert`` every rank holds the same model.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
        return
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
        "reparam.modules": json.dumps({n: c.to_dict() for n, c in converted_modules(model).items()},
                                      sort_keys=True),
        "reparam.aliases": json.dumps(aliases, sort_keys=True),
    }
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    with tempfile.TemporaryDirectory(dir=directory, prefix=".reparam-save-") as scratch:
        written, final = os.path.join(scratch, "written"), os.path.join(scratch, "final")
        save_file(_unshare(tensors), written, metadata=metadata)
        _finish_file(written, final)
        os.replace(final, path)


def load(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Rebuild the converted modules of a freshly built ``model`` from the
    file's recipe, then load every tensor.

    ``path``: a file written by :func:`save`, or a folder written by a
    converted transformers model's ``save_pretrained`` (recipe from its
    ``config.json``, tensors from its safetensors file or shards).

    ``model`` may be on CPU, on an accelerator, or built with
    ``accelerate.init_empty_weights()`` (parameters on the meta device,
    buffers real). Nothing is refitted: loaded outputs equal the saved
    model's exactly. Everything is checked before the model changes: a file
    that is damaged, not a reparam file or written for another architecture
    raises :class:`FileFormatError` (a ``ValueError``) and leaves ``model``
    exactly as it was.
    """
    path = os.fspath(path)
    check_model(model)
    modules, state = read_folder(model, path) if os.path.isdir(path) else _read_file(model, path)
    with ModuleSwaps(model) as swaps:
        for name, config in modules.items():
            method = get_method(config.method)
            swaps.swap(name, method, lambda old: method.restore(old, config))
        check_state(model, state, path)
        check_values(model, modules, state, path)
        on_meta = any(t.device.type == "meta" for t in model.state_dict().values())
        model.load_state_dict(_matching_devices(model, state), strict=True, assign=on_meta)
    integrations.converted(model)  # a transformers model: save_pretrained writes it compressed
    return model


def _read_file(model: nn.Module, path: str) -> tuple[dict[str, MethodConfig], dict[str, torch.Tensor]]:
    """The recipe and every tensor of a file written by ``save``, checked against ``model``."""
    try:
        with safe_open(path, framework="pt") as file:
            metadata = file.metadata() or {}
            keys = set(file.keys())
            check_checksum(metadata, path)
            modules = read_recipe(metadata, path)
            aliases = read_aliases(metadata, keys, path)
            check_targets(model, modules, path)
            state = {key: file.get_tensor(key) for key in sorted(keys)}
    except SafetensorError as err:
        raise FileFormatError(f"{path} is not a readable safetensors file (damaged or truncated?): {err}") from err
    state.update({key: state[kept] for key, kept in aliases.items()})
    return modules, state


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


def _finish_file(source: str, target: str) -> None:
    """Copy a safetensors file with its JSON header's keys sorted and the
    SHA-256 of its data section added to the metadata, in one pass.

    safetensors writes the metadata map in hash order, which changes from
    one save to the next; the data section and its offsets do not depend on
    the header's key order.
    """
    with open(source, "rb") as src, open(target, "wb") as dst:
        header = json.loads(src.read(int.from_bytes(src.read(8), "little")))
        dst.write(_header_bytes(header, "0" * 64))  # a placeholder of the digest's length
        digest = hashlib.sha256()
        while chunk := src.read(1 << 24):
            digest.update(chunk)
            dst.write(chunk)
        dst.seek(0)
        dst.write(_header_bytes(header, digest.hexdigest()))


def _header_bytes(header: dict, digest: str) -> bytes:
    """u64 little-endian length + the JSON header (keys sorted, the data's
    digest in its metadata), padded with spaces to a multiple of 8."""
    header["__metadata__"][CHECKSUM_KEY] = digest
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text
