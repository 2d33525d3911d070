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


def param_groups(model: nn.Module, weight_decay: float, ab_lr: float | None = None) -> list[dict]:
    """Optimizer groups: ``weight_decay`` on every parameter except a, b and the
    v of fixed-(a, b) companders (whose decay is :func:`weight_decay_penalty`).

    a and b get a group of their own, with learning rate ``ab_lr`` if given:
    their gradients sum over every weight of the layer, so the weights'
    learning rate is usually far too large for them.
    """
    ab: set[int] = set()
    fixed_v: set[int] = set()
    for module, compander in companders(model):
        ab.update(id(p) for p in compander.parameters())  # a, b when learnable
        if not isinstance(compander.log_a, nn.Parameter):
            fixed_v.add(id(module.parametrizations.weight.original))
    params = list(model.parameters())
    ab_group = {"params": [p for p in params if id(p) in ab], "weight_decay": 0.0}
    if ab_lr is not None:
        ab_group["lr"] = ab_lr
    return [{"params": [p for p in params if id(p) not in ab | fixed_v], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) in fixed_v], "weight_decay": 0.0},
            ab_group]


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
