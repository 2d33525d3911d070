"""The tensors of swapped-out modules, kept in a temporary file instead of in
memory while a conversion runs, so that an error can still restore them
exactly (``ModuleSwaps(model, spill=True)``).

A sequential conversion would otherwise hold every original layer next to
its compressed replacement until the end: for low_rank 0.8 on SmolLM2 that
is 1.8x the converted layers' bytes (docs/llm.md, "Memory").
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import warnings

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

# dtypes safetensors stores exactly; tensors of other dtypes stay in memory.
SPILLABLE_DTYPES = {torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                    torch.int16, torch.int8, torch.uint8, torch.bool}


@dataclasses.dataclass
class Spilled:
    """Tensors of one module whose values are in ``path`` (emptied in memory by ``free``)."""

    path: str
    tensors: list[torch.Tensor]  # the same objects the module holds (Parameters keep their identity)
    shapes: list[torch.Size]

    def free(self) -> None:
        """Empty the tensors in memory (their values are in ``path``)."""
        for tensor in self.tensors:
            tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)

    def load(self) -> None:
        """Put the values back into the same tensor objects, bit for bit."""
        values = load_file(self.path)
        for i, (tensor, shape) in enumerate(zip(self.tensors, self.shapes)):
            value = values[str(i)]
            if value.shape != shape or value.dtype != tensor.dtype:
                raise RuntimeError(f"{self.path} holds tensor {i} as {value.dtype} {tuple(value.shape)}, "
                                   f"expected {tensor.dtype} {tuple(shape)}")
            tensor.data = value.to(tensor.device, copy=True)  # owned memory: ``value`` maps the file, deleted next


class Spill:
    """A temporary folder (``tempfile.gettempdir()``: set ``TMPDIR`` to move it)
    holding one safetensors file per spilled module; removed by ``close``.

    If the folder cannot be written (no writable temporary directory, disk
    full), spilling stops with a warning and the originals stay in memory, as
    they would without spilling: peak memory is higher, the result the same.
    """

    def __init__(self) -> None:
        self.folder: str | None = None
        self._count = 0
        self._failed = False

    def write(self, module: nn.Module, keep: set[int]) -> Spilled | None:
        """Write ``module``'s tensors to a new file; None if there is nothing to spill.
        The caller records the result, then calls its ``free``: so that an
        interruption in between never loses a value.

        Only tensors that own their whole storage, share it with no other tensor
        of ``module``, and whose storage is not in ``keep`` (storages other live
        tensors use: tied weights, aliases) are spilled.
        """
        tensors = _spillable(module, keep)
        if not tensors or self._failed:
            return None
        path = None
        try:
            if self.folder is None:
                self.folder = tempfile.mkdtemp(prefix="reparam-swapped-")
            path = os.path.join(self.folder, f"{self._count}.safetensors")
            self._count += 1
            save_file({str(i): t.detach().cpu() for i, t in enumerate(tensors)}, path)
        except (OSError, SafetensorError) as err:
            self._failed = True
            if path is not None and os.path.exists(path):
                os.remove(path)
            warnings.warn(f"reparam could not write the swapped-out layers to a temporary file ({err}); they stay "
                          "in memory until the conversion ends. Set TMPDIR to a writable folder with room for "
                          "the converted layers' original size to lower peak memory")
            return None
        return Spilled(path, tensors, [t.shape for t in tensors])

    def close(self) -> None:
        """Delete the folder and every file in it."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def storages(module: nn.Module) -> set[int]:
    """Addresses of the storages of ``module``'s parameters and buffers."""
    return {_storage(t) for t in _tensors(module)} - {0}


def _spillable(module: nn.Module, keep: set[int]) -> list[torch.Tensor]:
    tensors = _tensors(module)
    counts: dict[int, int] = {}
    for tensor in tensors:
        counts[_storage(tensor)] = counts.get(_storage(tensor), 0) + 1
    return [t for t in tensors if _storage(t) != 0 and _storage(t) not in keep and counts[_storage(t)] == 1
            and _owns_storage(t)]


def _owns_storage(tensor: torch.Tensor) -> bool:
    return (type(tensor.data) is torch.Tensor and tensor.layout == torch.strided and tensor.device.type != "meta"
            and tensor.dtype in SPILLABLE_DTYPES and tensor.is_contiguous() and tensor.storage_offset() == 0
            and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size())


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    """Distinct parameter and buffer objects of ``module`` and its submodules."""
    found = {id(t): t for _, t in module.named_parameters(remove_duplicate=False)}
    found.update((id(t), t) for _, t in module.named_buffers(remove_duplicate=False) if t is not None)
    return list(found.values())


def _storage(tensor: torch.Tensor) -> int:
    if tensor.device.type == "meta":
        return 0
    return tensor.untyped_storage().data_ptr()
