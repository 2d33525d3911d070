"""How much each output channel of each layer matters to the model's output:
the diagonal of the Gauss–Newton matrix (for a language model, the Fisher)
at that layer's outputs, from a few backward passes on calibration data.

A small change δ to a layer's output y changes the model's output by about
J·δ (J = ∂output/∂y), so the model's loss grows by about ½·δᵀ JᵀF J δ, F the
output metric (the identity for hidden states; for logits, the Fisher of the
softmax, so the growth is the KL divergence). Keeping only the diagonal and
averaging over tokens, a layer whose weight error is E = W − Ŵ costs

    Σ_o s_o · (E G Eᵀ)_oo,   s_o = mean over tokens of (JᵀF J)_oo,

with G = Σ xxᵀ its calibration Gram (``LayerStats.weighted_error``). Unlike
a relative output error, this is in the model's own units, so the costs of
different layers add up: the size-budget allocator (``core.budget``) sums it.

Each s is estimated without forming J: for a random probe r on the output
with E[r rᵀ] = F, the gradient g = Jᵀ r has E[g²] = diag(JᵀF J). For hidden
states r is Gaussian; for logits r is the gradient of −log p(ŷ) for a token
ŷ drawn from the model's own prediction (the "true Fisher", not the
empirical one: the model's fit to the calibration text does not enter).
"""
from __future__ import annotations

import warnings
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .calibration import batch_mask, eval_mode, run_model
from .core.module import linear_shape
from .progress import progress_bar

PROBES = 2  # random probes per calibration batch; every probe averages over all the batch's tokens
SEED = 0


def collect_sensitivity(model: nn.Module, calib: Iterable[Any], layers: Mapping[str, nn.Module], *,
                        probes: int = PROBES, progress: bool = True) -> dict[str, torch.Tensor]:
    """name -> (out,) float64 mean squared output gradient of each layer in ``layers`` (see module doc).

    Runs ``model`` forward and ``probes`` times backward per batch of
    ``calib``, in eval mode; padded tokens (``attention_mask``) are left out.
    Parameters get no gradients; the model is left as it was.
    """
    generator = torch.Generator().manual_seed(SEED)
    sums = {name: torch.zeros(linear_shape(module)[1], dtype=torch.float64) for name, module in layers.items()}
    rows = dict.fromkeys(layers, 0)  # output rows (tokens) each layer's sum is over
    outputs: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if not output.requires_grad:  # e.g. frozen parameters: start the graph here
                output = output.detach().requires_grad_()
            outputs[name] = output
            return output
        return hook

    handles = [module.register_forward_hook(keep(name)) for name, module in layers.items()]
    try:
        with eval_mode(model), torch.enable_grad():
            for batch in progress_bar(calib, desc="measuring sensitivity", disable=not progress):
                outputs.clear()
                result = run_model(model, batch)
                mask = batch_mask(batch)
                names = [name for name in layers if name in outputs]
                for k in range(probes):
                    objective = _probe(result, mask, generator)
                    grads = torch.autograd.grad(objective, [outputs[n] for n in names], retain_graph=k < probes - 1,
                                                allow_unused=True)
                    for name, grad in zip(names, grads):
                        if grad is not None:
                            grad = _unpadded(grad, mask)
                            sums[name] += grad.double().square().sum(0) / probes
                            if k == 0:
                                rows[name] += grad.shape[0]
    finally:
        for handle in handles:
            handle.remove()
    unreached = [name for name, count in rows.items() if count == 0]
    if unreached:
        warnings.warn(f"{len(unreached)} layer(s), e.g. '{unreached[0]}', do not reach the model's output "
                      "(its logits, last_hidden_state or first tensor); they count as costing nothing and get "
                      "the smallest choice", stacklevel=2)
    return {name: total / max(rows[name], 1) for name, total in sums.items()}


def _probe(result: Any, mask: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """A scalar whose gradient at the output is a random probe r with E[r rᵀ] = the output metric."""
    logits = _field(result, "logits")
    if logits is not None:
        logits = logits.float()
        with torch.no_grad():
            probs = logits.softmax(-1).reshape(-1, logits.shape[-1])
            # Drawn on the CPU, where the seeded generator lives, whatever the model's device.
            drawn = torch.multinomial(probs.cpu(), 1, generator=generator).view(logits.shape[:-1]).to(logits.device)
        nll = -logits.log_softmax(-1).gather(-1, drawn.unsqueeze(-1)).squeeze(-1)  # (..., T)
        return (nll * _weights(mask, nll)).sum()
    hidden = _field(result, "last_hidden_state")
    hidden = hidden if hidden is not None else _first_tensor(result)
    probe = torch.randn(hidden.shape, generator=generator).to(hidden)
    return (hidden * probe * _weights(mask, hidden[..., 0]).unsqueeze(-1)).sum()


def _field(result: Any, name: str) -> torch.Tensor | None:
    value = result.get(name) if isinstance(result, Mapping) else getattr(result, name, None)
    return value if isinstance(value, torch.Tensor) and value.is_floating_point() else None


def _first_tensor(result: Any) -> torch.Tensor:
    values = result.values() if isinstance(result, Mapping) else result if isinstance(result, (tuple, list)) else [result]
    for value in values:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.requires_grad:
            return value
    raise TypeError("measuring layer sensitivity needs the model to return a floating-point tensor (or an output "
                    "with .logits or .last_hidden_state) that depends on the converted layers; got "
                    f"{type(result).__name__}")


def _weights(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """1 for real tokens, 0 for padding, shaped like ``like`` (B, T) where the mask fits."""
    if mask is not None and mask.shape == like.shape:
        return mask.to(like)
    return torch.ones_like(like)


def _unpadded(grad: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(tokens, out) rows of a (..., out) gradient, padding dropped."""
    if mask is not None and grad.dim() == 3 and grad.shape[:2] == mask.shape:
        return grad[mask.to(grad.device).bool()]
    return grad.reshape(-1, grad.shape[-1])

