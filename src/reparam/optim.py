"""Weight decay the way the compander paper applies it.

- fixed (a, b): decay acts on the effective weight w = Ψ(v), i.e. the penalty
  (λ/2)·‖Ψ(v)‖², whose gradient λ·Ψ(v)·Ψ'(v) reaches v through the chain rule;
- learnable (a, b): decay acts on v only, never on a or b.

    groups = reparam.optim.param_groups(model, weight_decay=5e-4)
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    loss = task_loss + reparam.optim.weight_decay_penalty(model, 5e-4)
"""
from __future__ import annotations

import torch
from torch import nn

from .methods.compander import companders
from .methods.scale_vector import MagnitudeDirection, RowColumnScales

NORMS = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)
SCALE_VECTORS = (MagnitudeDirection, RowColumnScales)


def param_groups(model: nn.Module, weight_decay: float, ab_lr: float | None = None) -> list[dict]:
    """Optimizer groups in Hugging Face Trainer's convention, plus the compander rules.

    ``weight_decay`` applies to weights only. No decay on: biases, the
    parameters of normalization layers (any ``*Norm`` module, e.g. LayerNorm,
    RMSNorm, BatchNorm), scale vectors (``scale_vector``: they rescale a
    normalization or a linear map, like a norm's γ), compander a and b, and
    the v of fixed-(a, b) companders (their decay acts on Ψ(v) through
    :func:`weight_decay_penalty`, added to the loss).

    a and b get a group of their own, with learning rate ``ab_lr`` if given:
    their gradients sum over every weight of the layer, so the weights'
    learning rate is usually far too large for them. Empty groups are left out.

    Example:
        >>> opt = torch.optim.AdamW(reparam.optim.param_groups(model, weight_decay=0.01), lr=1e-4)
    """
    ab: set[int] = set()
    no_decay: set[int] = set()
    for module, compander in companders(model):
        ab.update(id(p) for p in compander.parameters())  # a, b when learnable
        if not isinstance(compander.log_a, nn.Parameter):
            no_decay.add(id(module.parametrizations.weight.original))
    for module in model.modules():
        if _is_norm(module):
            no_decay.update(id(p) for p in module.parameters())
        elif isinstance(module, SCALE_VECTORS):
            no_decay.update(id(p) for p in module.parameters())
    for name, param in model.named_parameters():
        if name.rpartition(".")[2] == "bias":
            no_decay.add(id(param))
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in ab | no_decay], "weight_decay": weight_decay},
              {"params": [p for p in params if id(p) in no_decay - ab], "weight_decay": 0.0},
              {"params": [p for p in params if id(p) in ab], "weight_decay": 0.0,
               **({"lr": ab_lr} if ab_lr is not None else {})}]
    return [group for group in groups if group["params"]]


def _is_norm(module: nn.Module) -> bool:
    # transformers' norms (LlamaRMSNorm, T5LayerNorm, ...) are not torch classes; their names end in "Norm".
    return isinstance(module, NORMS) or type(module).__name__.endswith("Norm")


def weight_decay_penalty(model: nn.Module, weight_decay: float) -> torch.Tensor:
    """(λ/2)·Σ‖Ψ(v)‖² over the fixed-(a, b) companded weights; add it to the loss."""
    total = torch.zeros(())
    for module, compander in companders(model):
        if not isinstance(compander.log_a, nn.Parameter):
            total = total + module.weight.square().sum()
    return weight_decay / 2 * total


@torch.no_grad()
def adaptive_step(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """``optimizer.step()`` with the paper's rule for adaptive optimizers (Adam…):
    the adaptive step is computed on ∂L/∂Ψ, then multiplied by ∂Ψ/∂v.

    Works with any optimizer: v's gradient is divided by Ψ'(v) before the
    step (∂L/∂v = ∂L/∂Ψ · Ψ'(v)), and the step the optimizer took is scaled
    by Ψ'(v) after it.
    """
    taken = []
    for module, compander in companders(model):
        v = module.parametrizations.weight.original
        if v.grad is not None:
            slope = compander.slope(v)
            v.grad.div_(slope)
            taken.append((v, v.clone(), slope))
    optimizer.step()
    for v, before, slope in taken:
        v.copy_(before + (v - before) * slope)
