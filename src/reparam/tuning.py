"""Block-output tuning: after a block's layers are fitted one by one, their
continuous tensors (quantization scales, factors) are adjusted together by a
few steps of Adam so that the converted block's output matches the dense
block's on the calibration inputs.

Each fit minimizes its own layer's output error; the block's output also
depends on how the errors of its layers combine through attention, the MLP's
gate and the residual stream, which no single fit sees. Tuning the fitted
tensors to the block's output is block-wise reconstruction (BRECQ, Li et al.
2021; OmniQuant, Shao et al. 2024), kept small: only what the fit already
made continuous moves (the codes, supports and ranks stay as fitted), for two
epochs over the calibration batches by default. What the forward sees is each
tensor as it will be stored (fp16, sums of powers of two), the gradient
passing straight through that rounding. A block keeps the tuned values only
if its output error over all calibration batches went down.

Run by the sequential pipeline (``convert(..., tune=True)``), where the
dense block's outputs on the block's inputs come free from the statistics
pass and the next block is calibrated on the tuned block's outputs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Iterator

import torch
from torch import nn

from .core.config import ConfigError
from .core.module import ReparamModule


@dataclasses.dataclass(frozen=True)
class BlockTuning:
    """How each block's fitted tensors are tuned to its dense output (``convert(..., tune=...)``)."""

    # Passes over the calibration batches. On SmolLM2 shift_add 3-bit (32 windows of 256 tokens): 1 epoch took
    # perplexity 19.88 -> 19.24, 2 epochs -> 18.95, adding 237 s and 276 s at 2 threads (docs/llm.md).
    epochs: int = 2
    lr: float = 1e-2  # Adam's step, relative to each tensor's typical |value| (``ReparamModule.tuning_step``)
    batches_per_step: int = 4  # calibration batches whose gradients make one step
    seed: int = 0  # the order of the batches

    def __post_init__(self):
        for name in ("epochs", "batches_per_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"tune: {name}={value!r} must be a positive integer")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) \
                or self.lr <= 0:
            raise ConfigError(f"tune: lr={self.lr!r} must be a positive number")

    @classmethod
    def of(cls, tune: "BlockTuning | bool | None") -> "BlockTuning | None":
        """``convert``'s ``tune`` argument: True is the defaults, False or None no tuning."""
        if tune is None or tune is False:
            return None
        if tune is True:
            return cls()
        if not isinstance(tune, cls):
            raise ConfigError(f"tune={tune!r} must be True, False or a reparam.BlockTuning")
        return tune


@dataclasses.dataclass
class TuningResult:
    before: float  # the block's mean squared output error as fitted
    after: float  # ... as kept (``before`` if tuning did not lower it)
    outputs: list[torch.Tensor]  # the block's output hidden state per batch, as kept


def tune_block(block: nn.Module, inputs: list[tuple[torch.Tensor, tuple, dict, torch.Tensor | None]],
               targets: list[torch.Tensor], tuning: BlockTuning) -> TuningResult | None:
    """Tune the converted layers of ``block`` so its outputs on ``inputs`` approach ``targets``.

    ``inputs``: per calibration batch, (hidden state, further positional arguments, keyword arguments,
    (B, T) attention mask or None); ``targets``: the dense block's output hidden state per batch.
    The tuned values are kept only if the block's mean squared output error (over unmasked tokens) went
    down. The result holds the block's outputs as kept, the next block's inputs. None if the block has no
    tunable layers.
    """
    modules = {name: m for name, m in block.named_modules() if isinstance(m, ReparamModule) and m.TUNABLE}
    if not modules:
        return None
    # Each tensor moves as base + step·δ, Adam on δ: its steps are then ``lr`` times the tensor's typical size.
    tuned = {f"{name}.{tensor}" if name else tensor: (m, tensor, getattr(m, tensor).detach().float())
             for name, m in modules.items() for tensor in m.TUNABLE}
    steps = {key: m.tuning_step(tensor, base) for key, (m, tensor, base) in tuned.items()}
    deltas = {key: torch.zeros_like(base, requires_grad=True) for key, (_, _, base) in tuned.items()}

    def latent(key: str) -> torch.Tensor:
        return tuned[key][2] + steps[key] * deltas[key]

    def run(index: int) -> torch.Tensor:
        stored = {}
        for key, (m, tensor, _) in tuned.items():
            value = latent(key)
            stored[key] = _straight_through(value, m.stored_value(tensor, value.detach()))
        x, args, kwargs, _ = inputs[index]
        output = torch.func.functional_call(block, stored, (x, *args), kwargs)
        return output[0] if isinstance(output, (tuple, list)) else output

    def error(index: int, output: torch.Tensor) -> torch.Tensor:
        return _squared_error(output, targets[index], inputs[index][3])

    def evaluate(keep: bool) -> tuple[float, list[torch.Tensor] | None]:
        """Mean error over all batches, and the outputs if ``keep``."""
        total, outputs = 0.0, [] if keep else None
        with torch.no_grad():
            for i in range(len(inputs)):
                output = run(i)
                total += float(error(i, output))
                if keep:
                    outputs.append(output)
        return total / len(inputs), outputs

    with _differentiable_forward(modules.values()):
        before, _ = evaluate(keep=False)  # the fitted block's outputs are remade in the rare case they are kept
        parameters = list(deltas.values())
        optimizer = torch.optim.Adam(parameters, lr=tuning.lr)
        generator = torch.Generator().manual_seed(tuning.seed)
        for _ in range(tuning.epochs):
            order = torch.randperm(len(inputs), generator=generator).tolist()
            for first in range(0, len(order), tuning.batches_per_step):
                chosen = order[first:first + tuning.batches_per_step]
                # One batch's graph at a time, its gradient added up; only into the δ (inputs=), so the
                # block's own parameters (norms, the bias) get no .grad.
                optimizer.zero_grad()
                for i in chosen:
                    torch.autograd.backward(error(i, run(i)) / len(chosen), inputs=parameters)
                optimizer.step()
        after, outputs = evaluate(keep=True)
        if not after < before:  # NaN too: a step that overflowed
            for delta in parameters:
                delta.detach().zero_()
            return TuningResult(before, before, evaluate(keep=True)[1])
    with torch.no_grad():
        for key, (m, tensor, _) in tuned.items():
            getattr(m, tensor).copy_(m.stored_value(tensor, latent(key)))
    return TuningResult(before, after, outputs)


def _straight_through(latent: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """``stored``'s values and dtype (the layer's: fp16, bf16), ``latent``'s gradient."""
    latent = latent.to(stored.dtype)
    return latent + (stored - latent).detach()


def _squared_error(output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error per hidden value over the tokens the mask keeps (all without one)."""
    squared = (output.float() - target.float()).square().mean(-1)  # (B, T)
    if mask is None:
        return squared.mean()
    keep = mask.to(squared.device, torch.bool)
    return squared[keep].mean()


@contextlib.contextmanager
def _differentiable_forward(modules) -> Iterator[None]:
    """Each module runs its ``differentiable_forward``, which autograd follows back to the tuned tensors."""
    modules = list(modules)
    for m in modules:
        m.forward = m.differentiable_forward
    try:
        yield
    finally:
        for m in modules:
            del m.forward
