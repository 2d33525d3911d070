"""Per-layer input statistics from a few calibration batches, by forward hooks."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import nn

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


def collect_stats(model: nn.Module, calib: Iterable[Any], layers: Mapping[str, nn.Module], *,
                  progress: bool = True) -> dict[str, LayerStats]:
    """Run ``calib`` through ``model`` once, in eval mode under no_grad, and
    accumulate the inputs of each module in ``layers`` (name -> module).

    When a batch is a dict with an ``attention_mask`` of shape (B, T), inputs
    of shape (B, T, in) are reduced to the unmasked tokens, so padding does not
    pollute the statistics.
    """
    stats = {name: LayerStats.empty(_in_features(module)) for name, module in layers.items()}
    mask: list[torch.Tensor | None] = [None]

    def hook(name: str):
        def record(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            if mask[0] is not None and x.dim() == 3 and x.shape[:2] == mask[0].shape:
                x = x[mask[0].to(x.device).bool()]
            stats[name].add(x, layer=name)
        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in layers.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in progress_bar(calib, desc="calibrating", disable=not progress):
                mask[0] = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                run_model(model, batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    empty = [name for name, s in stats.items() if s.count == 0]
    if empty:
        raise RuntimeError(f"calibration never reached {empty[:5]}{'...' if len(empty) > 5 else ''}; "
                           "check that calib holds inputs the model's forward actually runs these layers on")
    return stats


def _in_features(module: nn.Module) -> int:
    if hasattr(module, "in_features"):
        return module.in_features
    return module.weight.shape[1]


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch

