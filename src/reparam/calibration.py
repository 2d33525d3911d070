"""Per-layer input statistics from a few calibration batches, by forward hooks."""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

from .core.module import linear_shape
from .core.stats import LayerStats
from .progress import progress_bar


def run_model(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on one calibration item: a tensor, a tuple of positional
    arguments, or a dict of keyword arguments (a tokenizer's output)."""
    device = next(model.parameters()).device
    batch = _to_device(batch, device)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def batch_mask(batch: Any) -> torch.Tensor | None:
    """The (B, T) ``attention_mask`` of a dict batch, if it has one."""
    return batch.get("attention_mask") if isinstance(batch, Mapping) else None


def block_hidden_state(output: Any) -> torch.Tensor:
    """The hidden state a block returned: its whole output, or the first item of a tuple or list."""
    return output[0] if isinstance(output, (tuple, list)) else output


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode, then give every submodule back its own
    train/eval flag (not the root's: a frozen BatchNorm stays frozen)."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


class StatsCollector:
    """Forward pre-hooks that accumulate the inputs of named layers into :class:`LayerStats`.

    Layers that receive the very same input tensor in a forward pass (q/k/v
    projections, gate/up) share one ``LayerStats`` object, accumulated once;
    consumers treat statistics as read-only. Call :meth:`start_batch` before
    each forward pass.

    >>> with StatsCollector({"fc": model.fc}) as collector:
    ...     collector.start_batch(); model(x)
    >>> stats = collector.stats()
    """

    def __init__(self, layers: Mapping[str, nn.Module]):
        self.layers = dict(layers)
        self._stats: dict[str, LayerStats] = {}
        self._owners: set[str] = set()  # layers whose LayerStats they created (the others share one)
        self._seen: dict[int, tuple[torch.Tensor, LayerStats]] = {}  # this batch: id(input) -> (input, its stats)
        self._mask: torch.Tensor | None = None
        self._handles: list = []

    def __enter__(self) -> "StatsCollector":
        self._handles = [module.register_forward_pre_hook(self._hook(name)) for name, module in self.layers.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._seen.clear()

    def start_batch(self, mask: torch.Tensor | None = None) -> None:
        """A new forward pass; ``mask`` (B, T) drops padded tokens from (B, T, in) inputs."""
        self._seen.clear()
        self._mask = mask

    def _hook(self, name: str):
        def record(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            seen = self._seen.get(id(x))
            shared = seen[1] if seen is not None and seen[0] is x else None
            current = self._stats.get(name)
            if current is None and shared is not None:  # first batch: the same input as an earlier layer
                self._stats[name] = shared
                return
            if current is not None and current is shared:  # already accumulated by the layer it shares with
                return
            if current is not None and name not in self._owners:
                raise RuntimeError(f"layer '{name}' read the same input tensor as another layer in the first "
                                   "calibration batch but not in a later one; statistics cannot be shared")
            if current is None:
                current = self._stats[name] = LayerStats.empty(linear_shape(self.layers[name])[0])
                self._owners.add(name)
            self._seen.setdefault(id(x), (x, current))
            current.add(self._unpadded(x), layer=name)  # add checks the width, dtype and values
        return record

    def _unpadded(self, x: torch.Tensor) -> torch.Tensor:
        mask = self._mask
        if mask is not None and isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[:2] == mask.shape:
            x = x[mask.to(x.device).bool()]  # (tokens, in)
        return x

    def stats(self) -> dict[str, LayerStats]:
        """name -> statistics, handed over (the collector keeps no reference, so the
        caller frees each as it goes); raises if some layer never ran."""
        empty = [name for name in self.layers if name not in self._stats or self._stats[name].count == 0]
        if empty:
            raise RuntimeError(f"calibration never reached {empty[:5]}{'...' if len(empty) > 5 else ''}; "
                               "check that calib holds inputs the model's forward actually runs these layers on")
        stats, self._stats = self._stats, {}
        return stats


def collect_stats(model: nn.Module, calib: Iterable[Any], layers: Mapping[str, nn.Module], *,
                  progress: bool = True) -> dict[str, LayerStats]:
    """Run ``calib`` through ``model`` once, in eval mode under no_grad, and
    accumulate the inputs of each module in ``layers`` (name -> module).

    When a batch is a dict with an ``attention_mask`` of shape (B, T), inputs
    of shape (B, T, in) are reduced to the unmasked tokens, so padding does not
    pollute the statistics. Layers fed the same tensor share one ``LayerStats``.
    Every submodule keeps its own train/eval flag.
    """
    with eval_mode(model), torch.no_grad(), StatsCollector(layers) as collector:
        for batch in progress_bar(calib, desc="calibrating", disable=not progress):
            collector.start_batch(batch_mask(batch))
            run_model(model, batch)
    return collector.stats()


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch
