"""How ``convert`` walks a model once the plan is made: calibrate, resolve,
fit and swap, either for all layers at once ("one_pass") or one repeated
block at a time ("sequential", GPTQ's and llm-compressor's pipeline).

Sequential: the inputs of the first block of the model's block stack (e.g.
the ``nn.ModuleList`` of decoder layers) are captured once, with the keyword
arguments each block gets (attention mask, position embeddings, ...); then for
each block only its target layers' statistics are collected, they are fitted
and swapped, and the converted block is run to make the next block's inputs,
so every layer is calibrated on what the compressed model really feeds it.
Layers outside the stack (an embedding projection, a classifier) are
calibrated in one final pass over the converted model. Peak memory: the
model, the cached block inputs and one block's statistics.

One pass is the case of a single stage holding every layer: statistics of all
target layers are collected together from the unconverted model.
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import time
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .calibration import StatsCollector, batch_mask, block_hidden_state, collect_stats, eval_mode, run_model
from .core.config import ConfigError
from .core.module import ReparamModule, linear_shape, linear_weight, row_slice, state_nbytes, state_numel
from .core.registry import get_method
from .core.stats import LayerStats, relative_error
from .distributed import SPLIT, Collective, step
from .heap import bounded_heap, release_free_memory
from .progress import progress_bar
from .report import LayerReport
from .sensitivity import collect_sensitivity
from .swap import ModuleSwaps
from .tuning import BlockStack, BlockTuning, tune_block, tune_stack

logger = logging.getLogger(__name__)
PIPELINES = ("auto", "sequential", "sequential_dense", "one_pass")
# What "auto" runs when the model has a block stack. Propagating the converted
# blocks' outputs ("sequential") lowered SmolLM2's perplexity at 3 bits (affine
# GPTQ: 23.56 vs 24.67) and cost little at 4 (15.69 vs 15.59); on MiniLM the
# two were within 0.001 fidelity (docs/llm.md).
AUTO_BLOCKWISE = "sequential"
# Block arguments that would make a block keep a KV cache across calibration batches.
CACHE_ARGUMENTS = ("past_key_values", "past_key_value", "layer_past", "cache")

# plan items (convert.Planned), statistics -> plan items with per-layer configs (convert._resolve)
Resolve = Callable[..., list]


@dataclasses.dataclass
class BlockCall:
    """One block's arguments for one calibration batch; ``args[0]`` is the hidden state."""

    args: list[Any]
    kwargs: dict[str, Any]
    mask: torch.Tensor | None  # (B, T) attention mask of the batch, to drop padding from statistics


class BlockOrderError(ConfigError):
    """The block stack does not run once per forward, in order, with its hidden
    state first: sequential conversion cannot replay it ("auto" falls back to one pass)."""


class _StopForward(Exception):
    """Raised by the capture hook once the last block's inputs are recorded."""


def run_pipeline(model: nn.Module, plan: list, calib: Iterable[Any] | None, resolve: Resolve, *,
                 pipeline: str = "auto", sequential_targets: str | None = None,
                 progress: bool = True, collective: Collective | None = None,
                 tuning: BlockTuning | None = None) -> list[LayerReport]:
    """Fit and swap every item of ``plan`` (all or nothing) and return its report rows, in plan order.

    ``pipeline``: "sequential" needs calibration data and a block stack (found
    automatically, or named by ``sequential_targets``: a ModuleList's path or
    the blocks' class name); "sequential_dense" goes block by block too, but
    feeds each block the unconverted blocks' outputs (one pass's statistics in
    sequential's memory); "one_pass" calibrates every layer at once on the
    unconverted model; "auto" is ``AUTO_BLOCKWISE`` when calibration is used
    and a block stack holds calibrated layers, else one pass.

    ``collective``: the ranks of a distributed conversion (``reparam.distributed``):
    statistics are summed over the ranks' calibration shards, each rank fits
    its share of every stage's layers, and the fitted tensors are broadcast.

    ``tuning``: after each block is fitted, its fitted tensors are tuned to the
    dense model's hidden states after it (``reparam.tuning``); needs a block-by-block pipeline.
    """
    if pipeline not in PIPELINES:
        raise ConfigError(f"pipeline={pipeline!r} is not one of {list(PIPELINES)}")
    if pipeline == "one_pass" and sequential_targets is not None:
        raise ConfigError("sequential_targets names blocks for block-by-block conversion, which "
                          "pipeline='one_pass' does not do; drop one of them")
    calibrated = calib is not None and any(p.config.uses_calibration() for p in plan)
    propagate = pipeline == "sequential" or (pipeline == "auto" and AUTO_BLOCKWISE == "sequential")
    blocks = []
    if pipeline != "one_pass" and calibrated:
        blocks = find_blocks(model, {p.name for p in plan if p.config.uses_calibration()}, sequential_targets)
    if pipeline.startswith("sequential") and not blocks:
        reason = ("needs calibration data (calib=) and a config that uses it" if not calibrated else
                  "found no stack of repeated blocks holding calibrated layers; name it with "
                  "sequential_targets='<ModuleList path or block class>'")
        raise ConfigError(f"pipeline={pipeline!r} {reason}, or use pipeline='one_pass'")
    if tuning is not None and not blocks:
        reason = ("pipeline='one_pass' converts every layer at once" if pipeline == "one_pass" else
                  "it needs calibration data (calib=) and a config that uses it" if not calibrated else
                  "no stack of repeated blocks holding calibrated layers was found; name it with "
                  "sequential_targets='<ModuleList path or block class>'")
        raise ConfigError(f"tune= tunes each converted block to the dense model's hidden states, but {reason}; "
                          "convert block by block or drop tune=")
    if tuning is not None and collective is not None:
        raise ConfigError("tune= is not supported in a distributed conversion (group=); drop one of them")
    allocating = _allocators(plan) if calibrated else {}
    ranked = {p.name: p.module for p in plan if id(p.config) in allocating}
    sensitivity: dict[str, torch.Tensor] = {}
    if ranked:  # measured on the unconverted model, before any swap
        calib = list(calib)
        sensitivity = step(collective, lambda: collect_sensitivity(model, calib, ranked, progress=progress))
        if collective is not None:
            collective.average(sensitivity)
        resolve = _with_sensitivity(resolve, sensitivity)
    rows: list[LayerReport] = []
    with ModuleSwaps(model, spill=True) as swaps, eval_mode(model), bounded_heap():
        if blocks:
            batches = list(calib)
            try:
                _sequential(model, plan, batches, blocks, resolve, swaps, rows, progress, propagate=propagate,
                            collective=collective, sensitivity=sensitivity, tuning=tuning)
            except BlockOrderError:  # the same model on every rank: each rank raises it, and each falls back
                if pipeline != "auto" or tuning is not None:
                    raise
                _one_pass(model, plan, batches, resolve, swaps, rows, progress, collective)  # nothing swapped yet
        else:
            _one_pass(model, plan, calib if calibrated else None, resolve, swaps, rows, progress, collective)
    order = {p.name: i for i, p in enumerate(plan)}
    return sorted(rows, key=lambda r: order[r.name])


def _allocators(plan: list) -> dict[int, Any]:
    """A fresh ``Allocator`` per rule that spends one size budget over its layers, by id of the rule's config."""
    rules: dict[int, list] = {}
    for item in plan:
        rules.setdefault(id(item.config), []).append(item)
    allocators = {key: items[0].config.allocator({p.name: p.module for p in items}) for key, items in rules.items()}
    return {key: allocator for key, allocator in allocators.items() if allocator is not None}


def _sensing(stats: dict[str, LayerStats], sensitivity: dict[str, torch.Tensor]) -> dict[str, LayerStats]:
    """``stats`` with each ranked layer's output sensitivity attached, on a per-layer
    copy (layers that share inputs share statistics, not sensitivities)."""
    return {name: dataclasses.replace(s, sensitivity=sensitivity[name]) if name in sensitivity else s
            for name, s in stats.items()}


def _with_sensitivity(resolve: Resolve, sensitivity: dict[str, torch.Tensor]) -> Resolve:
    def resolve_ranked(items: list, stats: dict[str, LayerStats], **kwargs) -> list:
        return resolve(items, _sensing(stats, sensitivity), **kwargs)
    return resolve_ranked


def with_configs(plan: list, configs: dict[str, Any]) -> list:
    """The plan with the layers named in ``configs`` given those configs (and their methods)."""
    return [dataclasses.replace(p, config=configs[p.name], method=get_method(configs[p.name].method))
            if p.name in configs else p for p in plan]


def find_blocks(model: nn.Module, layer_names: set[str], targets: str | None = None) -> list[tuple[str, nn.Module]]:
    """The model's stack of repeated blocks, in order: (name, block) pairs.

    Without ``targets``: the ``nn.ModuleList`` / ``nn.Sequential`` of blocks of
    one class that holds the most of ``layer_names``; none when no such list
    holds any. ``targets`` names a ModuleList's path, or the blocks' class name
    (all outermost modules of that class, in registration order).
    """
    if targets is not None:
        blocks = _named_blocks(model, targets)
    else:
        best, best_count = [], 0
        for name, module in model.named_modules():
            if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) == 0:
                continue
            children = [(f"{name}.{i}" if name else i, child) for i, child in module.named_children()]
            if len({type(child) for _, child in children}) != 1:
                continue
            count = sum(_inside(layer, prefix) for prefix, _ in children for layer in layer_names)
            if count > best_count:
                best, best_count = children, count
        blocks = best
    return [(str(name), block) for name, block in blocks]


def _named_blocks(model: nn.Module, targets: str) -> list[tuple[str, nn.Module]]:
    modules = dict(model.named_modules())
    if targets in modules and isinstance(modules[targets], (nn.ModuleList, nn.Sequential)):
        return [(f"{targets}.{i}" if targets else i, child) for i, child in modules[targets].named_children()]
    blocks: list[tuple[str, nn.Module]] = []
    for name, module in modules.items():
        if type(module).__name__ == targets and not any(_inside(name, outer) for outer, _ in blocks):
            blocks.append((name, module))
    if not blocks:
        raise ConfigError(f"sequential_targets={targets!r} is neither a ModuleList in the model nor the "
                          "class name of any of its modules; name e.g. 'model.layers' or 'LlamaDecoderLayer'")
    return blocks


def _inside(name: str, prefix: str) -> bool:
    return name.startswith(prefix + ".")


def _one_pass(model, plan, calib, resolve, swaps, rows, progress, collective=None) -> None:
    wanted = {p.name: p.module for p in plan if calib is not None and p.config.uses_calibration()}
    stats = step(collective, lambda: collect_stats(model, calib, wanted, progress=progress) if wanted else {})
    if collective is not None:
        collective.reduce_stats(stats)
    fit_and_swap(swaps, resolve(plan, stats, progress=progress), stats, rows, progress=progress,
                 collective=collective)


def _sequential(model, plan, batches, blocks, resolve, swaps, rows, progress, *, propagate: bool,
                collective: Collective | None = None, sensitivity: dict[str, torch.Tensor] | None = None,
                tuning: BlockTuning | None = None) -> None:
    last = max(i for i, (prefix, _) in enumerate(blocks) if any(_inside(p.name, prefix) for p in plan))
    blocks = blocks[:last + 1]  # the blocks after the last target need no pass
    calls = step(collective, lambda: capture_block_inputs(model, batches, [block for _, block in blocks]))
    hidden = [call[0].args[0] for call in calls]  # (B, T, hidden) per batch, the first block's input
    for call in calls:
        call[0].args[0] = None  # held once, in `hidden`
    release_free_memory()  # the capture's forward through every block
    # Tuning's targets are the dense model's own hidden states, carried through the dense blocks beside the
    # converted ones: a block is tuned to undo what the blocks before it got wrong as well as its own error
    # (OmniQuant's targets). Without propagation the converted blocks already run on them.
    dense_hidden = list(hidden) if tuning is not None and propagate else None
    end_to_end = tuning is not None and tuning.end_to_end_epochs > 0
    first_hidden = list(hidden) if end_to_end else None
    if sensitivity:
        plan = _allocate_by_blocks(model, plan, batches, blocks, hidden, calls, sensitivity, collective, progress)
    stages = [[p for p in plan if _inside(p.name, prefix)] for prefix, _ in blocks]
    staged = {id(p) for stage in stages for p in stage}
    outside = [p for p in plan if id(p) not in staged]
    for i, ((_, block), items) in enumerate(progress_bar(list(zip(blocks, stages)), desc="converting blocks",
                                                          disable=not progress)):
        wanted = {p.name: p.module for p in items if p.config.uses_calibration()}
        keep = not propagate  # the dense block's outputs are the next block's inputs

        def calibrate():
            with StatsCollector(wanted) as collector:
                outputs = _block_outputs(block, hidden, calls, i, collector, keep=keep) if wanted or keep else None
            return collector.stats(), outputs

        stats, unconverted = step(collective, calibrate)
        if dense_hidden is not None:  # before the swap, while the block is dense
            dense_hidden = _block_outputs(block, dense_hidden, calls, i)
        release_free_memory()  # the block's activations: the fits below start from the live set
        if collective is not None:
            collective.reduce_stats(stats)
        start = time.perf_counter()
        fit_and_swap(swaps, resolve(items, stats, progress=False), stats, rows, progress=False,
                     collective=collective)
        logger.info("block %d/%d (%s): %d layers fitted in %.1f s", i + 1, len(blocks), blocks[i][0], len(items),
                    time.perf_counter() - start)
        del stats  # this block's statistics are freed before the next block's are collected
        tuned = None
        if tuning is not None:
            start = time.perf_counter()
            inputs = [(x, tuple(call[i].args[1:]), call[i].kwargs, call[i].mask) for x, call in zip(hidden, calls)]
            tuned = tune_block(block, inputs, unconverted if dense_hidden is None else dense_hidden, tuning)
            del inputs
            if tuned is not None:
                logger.info("block %d/%d (%s): tuned in %.1f s, output error %.4g -> %.4g", i + 1, len(blocks),
                            blocks[i][0], time.perf_counter() - start, tuned.before, tuned.after)
        if end_to_end and i + 1 == len(blocks):  # the dense model's output of the last block
            final_targets = unconverted if dense_hidden is None else dense_hidden
        if i + 1 < len(blocks):
            if not propagate:
                hidden = unconverted
            elif tuned is not None:  # tuning ran the block as kept
                hidden = tuned.outputs
            else:
                hidden = step(collective, lambda: _block_outputs(block, hidden, calls, i))
            _release_caches(block)
        unconverted = tuned = None  # freed before the next block's are made
    del hidden, dense_hidden
    if end_to_end:
        _tune_end_to_end([block for _, block in blocks], first_hidden, calls, final_targets, tuning)
        del first_hidden, final_targets
    del calls
    if outside:
        _one_pass(model, outside, batches, resolve, swaps, rows, progress, collective)


def _tune_end_to_end(blocks: list[nn.Module], first_hidden: list[torch.Tensor], calls: list,
                     targets: list[torch.Tensor], tuning: BlockTuning) -> None:
    """Every converted block's tensors tuned together toward the dense model's output of the last block."""
    start = time.perf_counter()
    arguments = [[(tuple(call.args[1:]), call.kwargs) for call in batch_calls] for batch_calls in calls]
    inputs = [(hidden, batch_calls[0].mask) for hidden, batch_calls in zip(first_hidden, calls)]
    result = tune_stack(BlockStack(blocks, arguments), inputs, targets, tuning)
    if result is not None:
        logger.info("%d blocks: tuned end to end in %.1f s, output error %.4g -> %.4g", len(blocks),
                    time.perf_counter() - start, result.before, result.after)
    for block in blocks:
        _release_caches(block)


def _release_caches(block: nn.Module) -> None:
    """Drop what the converted layers of a block derived while it ran (see
    ``ReparamModule.release_caches``). Kept for every block, dense_sparse's
    dense S alone is 195 MiB on SmolLM2 at size_ratio 0.8, 19% of the loaded
    process; a converted model rebuilds it on its first forward."""
    for module in block.modules():
        if isinstance(module, ReparamModule):
            module.release_caches()


def _allocate_by_blocks(model, plan, batches, blocks, hidden, calls, sensitivity, collective, progress) -> list:
    """The plan with every size-budget rule resolved over the whole model
    before any block is converted: each sweep runs the unconverted blocks one
    at a time and hands each rule's ``Allocator`` one block's layers and
    statistics at a time (first the cheap scores, then, if asked, the
    refinement around the first choice), so only one block's statistics are
    held; the layers outside the stack come last, from one pass of the model."""
    allocators = _allocators(plan)
    ranked = [p for p in plan if id(p.config) in allocators]

    def sweep(visit: Callable[[Any, Any, LayerStats], None], desc: str) -> None:
        def visit_all(items: list, stats: dict[str, LayerStats]) -> None:
            if collective is not None:
                collective.reduce_stats(stats)
            stats = _sensing(stats, sensitivity)
            step(collective, lambda: [visit(allocators[id(p.config)], p, stats[p.name]) for p in items])

        x = hidden
        for i, (prefix, block) in enumerate(progress_bar(blocks, desc=desc, disable=not progress)):
            items = [p for p in ranked if _inside(p.name, prefix)]
            with StatsCollector({p.name: p.module for p in items}) as collector:
                x = step(collective, lambda: _block_outputs(block, x, calls, i, collector, keep=i + 1 < len(blocks)))
            visit_all(items, step(collective, collector.stats) if items else {})
        outside = [p for p in ranked if not any(_inside(p.name, prefix) for prefix, _ in blocks)]
        if outside:
            visit_all(outside, step(collective, lambda: collect_stats(model, batches, {p.name: p.module for p in outside},
                                                                       progress=False)))

    sweep(lambda allocator, p, stats: allocator.score(p.name, p.module, stats), "scoring candidates")
    for allocator in allocators.values():
        allocator.solve()
    if any(allocator.refine for allocator in allocators.values()):
        sweep(lambda allocator, p, stats: allocator.refine_layer(p.name, p.module, stats) if allocator.refine else None,
              "refining choices")
        for allocator in allocators.values():
            allocator.solve()
    return with_configs(plan, {p.name: allocators[id(p.config)].chosen[p.name] for p in ranked})


def capture_block_inputs(model: nn.Module, batches: list[Any], blocks: list[nn.Module]) -> list[list[BlockCall]]:
    """Per batch, the arguments each block is called with, from one forward pass
    of the model stopped after the last block's inputs are known.

    Only the first block keeps its hidden state; the others' are recomputed by
    the pipeline. A cache argument (``past_key_values``, ...) is set to None and
    ``use_cache`` to False, so blocks can be rerun without growing a KV cache.
    """
    current: list[BlockCall] = []

    def hook(index: int):
        def capture(block: nn.Module, args: tuple, kwargs: dict) -> None:
            if len(current) != index:
                raise BlockOrderError(f"sequential conversion needs every block to run once per forward, in "
                                  f"order; block {index} ran after {len(current)} block(s). Use pipeline='one_pass'")
            if not args:
                raise BlockOrderError("sequential conversion needs each block's hidden state as its first positional "
                                  "argument; use pipeline='one_pass'")
            args, kwargs = _without_cache(block, args, kwargs)
            if index > 0:
                args[0] = None  # recomputed from the converted previous block
            current.append(BlockCall(args, kwargs, None))
            if index == len(blocks) - 1:
                raise _StopForward
        return capture

    handles = [block.register_forward_pre_hook(hook(i), with_kwargs=True) for i, block in enumerate(blocks)]
    calls: list[list[BlockCall]] = []
    try:
        with torch.no_grad():
            for batch in batches:
                current = []
                try:
                    run_model(model, batch)
                except _StopForward:
                    pass
                if len(current) != len(blocks):
                    raise BlockOrderError(f"calibration reached {len(current)} of the {len(blocks)} blocks; "
                                      "use pipeline='one_pass'")
                mask = batch_mask(batch)
                for call in current:
                    call.mask = mask
                calls.append(current)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _without_cache(block: nn.Module, args: tuple, kwargs: dict) -> tuple[list[Any], dict[str, Any]]:
    try:
        params = list(inspect.signature(block.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = positional[:len(args)] + [None] * (len(args) - len(positional))
    args = [_no_cache(name, value) for name, value in zip(names, args)]
    return args, {name: _no_cache(name, value) for name, value in kwargs.items()}


def _no_cache(name: str | None, value: Any) -> Any:
    if name in CACHE_ARGUMENTS:
        return None
    return False if name == "use_cache" and value is not None else value


@torch.no_grad()
def _block_outputs(block: nn.Module, hidden: list[torch.Tensor], calls: list[list[BlockCall]], index: int,
                   collector: StatsCollector | None = None, *, keep: bool = True) -> list[torch.Tensor]:
    """Block ``index`` run on every batch's hidden state; its output hidden states (if ``keep``)."""
    outputs = []
    for x, call in zip(hidden, calls):
        if collector is not None:
            collector.start_batch(call[index].mask)
        output = block(x, *call[index].args[1:], **call[index].kwargs)
        if keep:
            outputs.append(block_hidden_state(output))
    return outputs


def fit_and_swap(swaps: ModuleSwaps, items: list, stats: dict[str, LayerStats], rows: list[LayerReport], *,
                 progress: bool, collective: Collective | None = None) -> None:
    """Fit each plan item, swap it in, and append its report row. Each layer's
    statistics are released as soon as it is fitted (shared ones with their last reader).

    With a ``collective`` each rank fits the items assigned to it and builds
    empty skeletons for the others, which are then filled from their owners;
    a layer split by rows (see ``distributed.assign``) is fitted a slice per
    rank and put together the same way; in-place methods (cheap, data-free)
    run on every rank. Output errors are measured where the rows were fitted
    and summed over the ranks in one all-reduce.
    """
    owners = _owners(items, collective)

    def fit_mine() -> list[tuple]:
        done = []
        for item, owner in zip(progress_bar(items, desc="converting", disable=not progress, total=len(items)),
                               owners):
            layer_stats = stats.pop(item.name, None)
            before = state_numel(item.module), state_nbytes(item.module)
            # In-place methods change the module's weight: the error is measured against a copy.
            original = linear_weight(item.module).detach().clone() if layer_stats is not None else None
            part = None
            if owner == SPLIT:  # this rank's slice of the rows, fitted on its own; the skeleton is filled later
                my_rows = collective.rows(linear_shape(item.module)[1])
                part = item.method.apply(row_slice(item.module, my_rows), item.config, layer_stats)
                original = None if original is None else original[my_rows]
            mine = owner is None or owner == collective.rank
            build = (lambda old: item.method.apply(old, item.config, layer_stats)) if mine else \
                (lambda old: item.method.restore(old, item.config))
            new = swaps.swap(item.name, item.method, build, aliases=item.aliases)
            fitted = new if mine else part
            # (‖(W − Ŵ)X‖², ‖WX‖²) of the rows fitted here (zeros if none), measured now so the statistics can go.
            terms = None if layer_stats is None else torch.zeros(2, dtype=torch.float64) if fitted is None else \
                layer_stats.squared_errors(original, fitted.weight)
            done.append((item, new, owner, part, terms, before))
            release_free_memory()  # the fit's temporaries and the spilled original, not kept by glibc's heap
        return done

    done = step(collective, fit_mine)
    terms = torch.stack([torch.zeros(2, dtype=torch.float64) if t is None else t for *_, t, _ in done]) \
        if done else torch.zeros(0, 2, dtype=torch.float64)
    if collective is not None:
        for item, new, owner, part, *_ in done:
            if owner == SPLIT:
                collective.share_rows(new, part, item.method.row_dims)
            elif owner is not None:
                collective.share(new, owner)
        # Summed over the ranks, except for layers that every rank fitted whole.
        everywhere = torch.tensor([owner is None for _, _, owner, *_ in done], dtype=torch.bool)
        terms = torch.where(everywhere[:, None], terms, collective.sum(terms))
    for (item, new, _, _, measured, (numel, nbytes)), (error, reference) in zip(done, terms):
        rows.append(LayerReport(item.name, item.method.name, numel, state_numel(new), nbytes, state_nbytes(new),
                                None if measured is None else relative_error(error, reference),
                                item.config.to_dict()))


def _owners(items: list, collective: Collective | None) -> list[int | None]:
    """Per item, the rank that fits it, ``SPLIT``, or None where every rank applies it (no collective, or an
    in-place method: cheap and data-free)."""
    if collective is None:
        return [None] * len(items)
    shapes = [linear_shape(p.module) for p in items]
    costs = [0.0 if p.method.undo is not None else p.config.fitting_cost(*shape) for p, shape in zip(items, shapes)]
    slice_costs = [p.config.fitting_cost(inputs, -(-outputs // collective.world))
                   if p.method.row_dims is not None and p.method.undo is None and outputs >= collective.world
                   else None
                   for p, (inputs, outputs) in zip(items, shapes)]
    owners = collective.owners(costs, slice_costs)
    return [None if p.method.undo is not None else owner for p, owner in zip(items, owners)]
