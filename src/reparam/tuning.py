"""Block-output tuning: after a block's layers are fitted one by one, their
continuous tensors (quantization scales, factors), and optionally the
quantizers' codes, are adjusted together by a few steps of Adam so that the
converted block's output matches the dense model's hidden state after that
block, on the calibration data.

Each fit minimizes its own layer's output error; the block's output also
depends on how the errors of its layers combine through attention, the MLP's
gate and the residual stream, which no single fit sees. Tuning the fitted
tensors to the block's output is block-wise reconstruction (BRECQ, Li et al.
2021; OmniQuant, Shao et al. 2024; EfficientQAT, Chen et al. 2024), kept
small: two epochs over the calibration batches by default, and the supports
and ranks stay as fitted. What the forward sees is each tensor as it will be
stored (fp16, sums of powers of two), the gradient passing straight through
that rounding. With ``BlockTuning(codes=True)`` the quantizers' codes are
learned too, through a float weight per quantized layer whose nearest levels
the forward uses, its gradient passing straight through the choice of level
(``QuantizedLinear.tuning``). A block keeps the tuned values only if its
output error over all calibration batches went down.

Run by the sequential pipeline (``convert(..., tune=True)``). The targets
are the dense model's own hidden states, carried block by block beside the
converted model's, so a block is also tuned to undo what the blocks before
it got wrong; the next block is calibrated on the tuned block's outputs.

With ``end_to_end_epochs``, a last stage tunes every converted block's
tensors together (``tune_stack``): the blocks run in sequence from the first
block's cached inputs and the last block's output is matched to the dense
model's (the end-to-end stage of EfficientQAT, Chen et al. 2024, on the
same tensors). A block sees its own error; only this stage sees how the
errors of all blocks combine.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from typing import Iterator

import torch
import torch.utils.checkpoint
from torch import nn

from .calibration import block_hidden_state
from .core.config import ConfigError, check_flag
from .core.module import ReparamModule


@dataclasses.dataclass(frozen=True)
class BlockTuning:
    """How each block's fitted tensors are tuned to the dense model's hidden states (``convert(..., tune=...)``)."""

    # Passes over the calibration batches. On SmolLM2 shift_add 3-bit (32 windows of 256 tokens), 2 epochs took
    # perplexity 19.88 -> 18.54 in 248 s more at 2 threads (docs/llm.md).
    epochs: int = 2
    # Adam's first step, relative to each tensor's typical |value| (``ReparamModule.tuning_step``); it decays to
    # zero along a cosine. Factorized layers do better with lr=3e-3 and batches_per_step=1 (docs/llm.md).
    lr: float = 1e-2
    batches_per_step: int = 4  # calibration batches whose gradients make one step
    seed: int = 0  # the order of the batches
    # Learn the quantizers' codes too, not only their scales (``QuantizedLinear.tuning``). MiniLM, 4 epochs one
    # batch per step: auto 3.0 bits 0.9741 -> 0.9807 fidelity, shift_add 2-bit 0.9324 -> 0.9532 (docs/budget.md).
    # Off by default for its cost: a float32 copy of each of the block's weights and Adam's two moments of it,
    # and on SmolLM2 shift_add-3 (2 epochs, 4 windows per step) 1.8x the conversion time (775 s against 429 s)
    # for perplexity 18.54 -> 18.44 (docs/llm.md).
    codes: bool = False
    # After the last block: passes in which every converted block's tensors are tuned together, so that the last
    # block's output matches the dense model's (EfficientQAT's end-to-end stage, on the block stack); 0 skips it.
    # Off by default for its time: on SmolLM2 2 epochs took longer than the block tuning (docs/llm.md).
    end_to_end_epochs: int = 0
    end_to_end_lr: float = 1e-3  # as ``lr``, for the end-to-end passes

    def __post_init__(self):
        for name, least in (("epochs", 1), ("batches_per_step", 1), ("end_to_end_epochs", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                kind = "a positive integer" if least else "a non-negative integer"
                raise ConfigError(f"tune: {name}={value!r} must be {kind}")
        check_flag("tune", "codes", self.codes)
        for name in ("lr", "end_to_end_lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ConfigError(f"tune: {name}={value!r} must be a positive number")

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
    (B, T) attention mask or None); ``targets``: per batch, the hidden state the block's output should match
    (the dense model's).
    The tuned values are kept only if the block's mean squared output error (over unmasked tokens) went
    down. The result holds the block's outputs as kept, the next block's inputs. None if the block has no
    tunable layers.
    """
    modules = {name: m for name, m in block.named_modules() if isinstance(m, ReparamModule)}
    with contextlib.ExitStack() as holds:
        tuned = {f"{name}.{tensor}" if name else tensor: (m, tensor) for name, m in modules.items()
                 for tensor in holds.enter_context(m.tuning(codes=tuning.codes))}
        return _tune(block, list(modules.values()), tuned, inputs, targets, tuning) if tuned else None


def _tune(block: nn.Module, modules: list[ReparamModule], tuned: dict[str, tuple[ReparamModule, str]],
          inputs: list[tuple[torch.Tensor, tuple, dict, torch.Tensor | None]], targets: list[torch.Tensor],
          tuning: BlockTuning) -> TuningResult:
    """``tune_block`` on the tensors ``tuned`` (block path of the tensor → (its module, its name)) of the
    block's converted layers ``modules``."""
    # Adam on θ = value / step: Adam's steps do not depend on the gradient's scale, so each tensor moves by
    # ``lr`` times its typical size. θ is the only float32 copy; the module's own tensors stay as fitted
    # until the tuned values are kept. A tensor of zeros gets a tiny step: it stays (nearly) where it is.
    steps, thetas = {}, {}
    for key, (m, tensor) in tuned.items():
        value = getattr(m, tensor).detach().to(torch.float32, copy=True)
        steps[key] = m.tuning_step(tensor, value).clamp_min(torch.finfo(torch.float32).tiny)
        thetas[key] = value.div_(steps[key]).requires_grad_()

    def latent(key: str) -> torch.Tensor:
        return steps[key] * thetas[key]

    def run(index: int, as_fitted: bool = False) -> torch.Tensor:
        x, args, kwargs, _ = inputs[index]
        if as_fitted:
            output = block(x, *args, **kwargs)
        else:
            stored = {}
            for key, (m, tensor) in tuned.items():
                value = latent(key)
                stored[key] = _straight_through(value, m.stored_value(tensor, value.detach()))
            output = torch.func.functional_call(block, stored, (x, *args), kwargs)
        return block_hidden_state(output)

    def error(index: int, output: torch.Tensor) -> torch.Tensor:
        return _squared_error(output, targets[index], inputs[index][3])

    def evaluate(keep: bool, as_fitted: bool = False) -> tuple[float, list[torch.Tensor] | None]:
        """Mean error over all batches, and the outputs if ``keep``."""
        total, outputs = 0.0, [] if keep else None
        with torch.no_grad():
            for i in range(len(inputs)):
                output = run(i, as_fitted)
                total += float(error(i, output))
                if keep:
                    outputs.append(output)
        return total / len(inputs), outputs

    with _differentiable_forward(modules):
        before, _ = evaluate(keep=False, as_fitted=True)  # the outputs are remade in the rare case they are kept
        parameters = list(thetas.values())
        optimizer = torch.optim.Adam(parameters, lr=tuning.lr)
        generator = torch.Generator().manual_seed(tuning.seed)
        total = tuning.epochs * math.ceil(len(inputs) / tuning.batches_per_step)
        # The step decays to zero along a cosine: a fixed step left the last iterate wandering (SmolLM2 block 0,
        # dense_sparse-0.8, 2 epochs at lr 3e-3: output error 0.0802 -> 0.0619 fixed, 0.0572 decayed).
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
        for _ in range(tuning.epochs):
            order = torch.randperm(len(inputs), generator=generator).tolist()
            for first in range(0, len(order), tuning.batches_per_step):
                chosen = order[first:first + tuning.batches_per_step]
                # One batch's graph at a time, its gradient added up; only into the θ (inputs=), so the
                # block's own parameters (norms, the bias) get no .grad.
                optimizer.zero_grad()
                for i in chosen:
                    torch.autograd.backward(error(i, run(i)) / len(chosen), inputs=parameters)
                optimizer.step()
                schedule.step()
        del optimizer  # its moment estimates: two more copies of the tuned tensors
        after, outputs = evaluate(keep=True)
        if not after < before:  # NaN too: a step that overflowed
            return TuningResult(before, before, evaluate(keep=True, as_fitted=True)[1])
    with torch.no_grad():
        for key, (m, tensor) in tuned.items():
            getattr(m, tensor).copy_(m.stored_value(tensor, latent(key)))
    return TuningResult(before, after, outputs)


class BlockStack(nn.Module):
    """Blocks run in order on one calibration batch, each with the further arguments it was called with there."""

    def __init__(self, blocks: list[nn.Module], arguments: list[list[tuple[tuple, dict]]]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.arguments = arguments  # per batch, per block: (positional arguments after the hidden state, keywords)

    def forward(self, hidden: torch.Tensor, batch: int) -> torch.Tensor:
        for block, (args, kwargs) in zip(self.blocks, self.arguments[batch]):
            output = _checkpointed(block, hidden, args, kwargs) if torch.is_grad_enabled() else \
                block(hidden, *args, **kwargs)
            hidden = block_hidden_state(output)
        return hidden


def _checkpointed(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict):
    """``block(hidden, *args, **kwargs)`` recomputed in the backward pass: of its activations only the input is
    kept, so tuning a stack of blocks holds about one block's. The block's tensors as they are now (the tuned
    values ``tune_block`` put in place with ``functional_call``) are inputs of the checkpoint, because the
    recomputation runs after that call has put the module's own tensors back."""
    names, tensors = zip(*itertools.chain(block.named_parameters(), block.named_buffers()))

    def run(hidden: torch.Tensor, *tensors: torch.Tensor):
        return torch.func.functional_call(block, dict(zip(names, tensors)), (hidden, *args), kwargs)

    return torch.utils.checkpoint.checkpoint(run, hidden, *tensors, use_reentrant=False)


def tune_stack(stack: BlockStack, inputs: list[tuple[torch.Tensor, torch.Tensor | None]],
               targets: list[torch.Tensor], tuning: BlockTuning) -> TuningResult | None:
    """Tune every converted layer of ``stack`` together so its outputs on ``inputs`` (per batch: the first
    block's hidden state and the attention mask or None) approach ``targets`` (the dense model's output of the
    last block), for ``tuning.end_to_end_epochs`` passes at ``tuning.end_to_end_lr``; kept only if the error
    went down, as in ``tune_block``."""
    batches = [(hidden, (index,), {}, mask) for index, (hidden, mask) in enumerate(inputs)]
    return tune_block(stack, batches, targets,
                      dataclasses.replace(tuning, epochs=tuning.end_to_end_epochs, lr=tuning.end_to_end_lr))


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
