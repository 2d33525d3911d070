"""Per-layer input statistics that data-aware methods consume."""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class LayerStats:
    """Running statistics of one layer's inputs x (rows of shape (in,)).

    Only sums are kept, never activations, so memory is O(in²) per layer.
    Everything is float64 on CPU: Gram matrices of long calibration runs lose
    precision in float32, and every consumer decomposes them in float64.

    Read-only for consumers: layers that read the same input tensor (q/k/v,
    gate/up) share one object, so a method must never change it in place
    (none does: fits copy what they modify, e.g. ``Compensation``'s permuted Hessian).
    """

    gram: torch.Tensor      # (in, in) float64: Σ xᵀx
    abs_sum: torch.Tensor   # (in,) float64: Σ |x|
    count: int = 0          # tokens seen
    # (out,) float64, per output channel of the layer these statistics are
    # attached to: how much an error there costs the model's output
    # (``reparam.sensitivity``). Set only for the allocator of a size budget,
    # on a per-layer copy (inputs are shared, outputs are not).
    sensitivity: torch.Tensor | None = None

    @classmethod
    def empty(cls, in_features: int) -> "LayerStats":
        return cls(
            gram=torch.zeros(in_features, in_features, dtype=torch.float64),
            abs_sum=torch.zeros(in_features, dtype=torch.float64),
        )

    @classmethod
    def from_inputs(cls, x: torch.Tensor) -> "LayerStats":
        """Statistics of a (tokens, in) batch; handy in tests and for single layers."""
        stats = cls.empty(x.shape[-1] if isinstance(x, torch.Tensor) and x.dim() else 0)
        stats.add(x)
        return stats

    def add(self, x: torch.Tensor, layer: str | None = None) -> None:
        """Accumulate a (tokens, in) batch of inputs (``layer`` names it in errors)."""
        where = f"layer '{layer}'" if layer else "the layer"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"calibration gave {where} a {type(x).__name__}, not a tensor; calib must hold "
                            "model inputs (tensors, tuples of them, or dicts of keyword arguments)")
        if not x.is_floating_point():
            raise TypeError(f"calibration gave {where} {x.dtype} inputs; its inputs must be real floating point "
                            "(pass what the model's forward takes, e.g. token ids to the model, not to the layer)")
        if x.dim() == 0 or x.shape[-1] != self.gram.shape[0]:
            raise ValueError(f"calibration gave {where} inputs of shape {tuple(x.shape)}: last dimension "
                             f"{x.shape[-1] if x.dim() else None}, but the layer takes {self.gram.shape[0]} "
                             "features; the calibration inputs do not fit this model")
        x = x.detach().reshape(-1, x.shape[-1]).to("cpu", torch.float64)
        if not torch.isfinite(x).all():
            raise ValueError(f"calibration inputs of {where} contain NaN or Inf; check the calibration batches "
                             "(or the layers before this one, e.g. an overflow in float16)")
        self.gram.addmm_(x.T, x)
        self.abs_sum.add_(x.abs().sum(0))
        self.count += x.shape[0]

    @property
    def mean_abs(self) -> torch.Tensor:
        """(in,) mean |x_j| per input channel."""
        return self.abs_sum / max(self.count, 1)

    def output_error(self, weight: torch.Tensor, approx: torch.Tensor) -> float:
        """Relative output error ‖(W − Ŵ)X‖_F / ‖WX‖_F on the calibration inputs.

        Exact from the Gram matrix alone: ‖AX‖² = tr(A G Aᵀ).
        """
        return relative_error(*self.squared_errors(weight, approx))

    def squared_errors(self, weight: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
        """(‖(W − Ŵ)X‖², ‖WX‖²) as a float64 (2,) tensor: sums over the rows, so
        the terms of row slices add up to those of the whole weight."""
        weight = weight.detach().to("cpu", torch.float64)
        delta = weight - approx.detach().to("cpu", torch.float64)
        return torch.stack([((delta @ self.gram) * delta).sum(), ((weight @ self.gram) * weight).sum()])

    def weighted_error(self, weight: torch.Tensor, approx: torch.Tensor) -> float:
        """Σ_o s_o·‖(W − Ŵ)_o X‖²: the growth of the model's loss that the
        error causes, to second order (needs ``sensitivity`` s; see ``reparam.sensitivity``)."""
        if self.sensitivity is None:
            raise ValueError("weighted_error needs the layer's sensitivity; see reparam.sensitivity")
        delta = weight.detach().to("cpu", torch.float64) - approx.detach().to("cpu", torch.float64)
        per_row = ((delta @ self.gram) * delta).sum(1).clamp_min(0)  # (out,) ‖(W − Ŵ)_o X‖²
        return float(per_row @ self.sensitivity)


def relative_error(error: torch.Tensor, reference: torch.Tensor) -> float:
    """√(error / reference) of the two terms of :meth:`LayerStats.squared_errors`."""
    return float((error / reference.clamp_min(1e-300)).clamp_min(0).sqrt())
