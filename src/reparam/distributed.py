"""Conversion across processes and machines with ``torch.distributed``.

When ``convert`` runs inside an initialized default process group (torchrun,
gloo on CPU, NCCL on CUDA), or is given one, every rank passes its own shard
of the calibration data and the ranks work in lockstep:

- statistics (Gram matrices, channel sums, token counts) are all-reduced,
  so every rank holds those of all the data;
- the layers of a block (or of the whole model, in one pass) are assigned to
  ranks by their estimated fitting cost (longest-processing-time bin packing);
- each rank fits its layers, then every fitted layer's tensors are broadcast
  from the rank that fitted it, so all ranks end with the identical model;
- before each collective the ranks agree on whether any of them failed, so
  an error on one rank is raised on every rank (each then restores its
  model); a rank that dies makes the others fail when the process group's
  timeout expires (or at once, when the backend sees the connection close),
  with an error that says so.

Every rank must call the methods here in the same order; ``convert``'s
pipeline does.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .core.stats import LayerStats

T = TypeVar("T")
MESSAGE_BYTES = 2048  # room for an error message sent to the other ranks


class RankFailed(RuntimeError):
    """Conversion failed on another rank (this rank's model was restored)."""


@dataclasses.dataclass
class Collective:
    """The process group a conversion runs in, and the bytes its collectives moved."""

    group: dist.ProcessGroup | None = None
    bytes_moved: int = 0

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def world(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def device(self) -> torch.device:
        # NCCL moves CUDA tensors only; gloo moves CPU tensors.
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def agree(self, error: BaseException | None) -> None:
        """Raise on every rank if ``error`` happened on any: the failing rank
        re-raises its own, the others a :class:`RankFailed` with its message."""
        flag = torch.tensor([self.rank if error is not None else self.world], device=self.device)
        self._all_reduce(flag, dist.ReduceOp.MIN)
        failed = int(flag)
        if failed == self.world:
            return
        message = torch.zeros(MESSAGE_BYTES, dtype=torch.uint8, device=self.device)
        if failed == self.rank:
            text = f"{type(error).__name__}: {error}".encode()[:MESSAGE_BYTES]
            message[:len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
        self._broadcast(message, failed)
        if error is not None:
            raise error
        text = bytes(message.cpu().tolist()).rstrip(b"\0").decode(errors="replace")
        raise RankFailed(f"conversion failed on rank {failed} of {self.world}, so every rank restored its "
                         f"model: {text}")

    def reduce_stats(self, stats: dict[str, LayerStats]) -> None:
        """Sum every rank's statistics in place (layers sharing one object are reduced once)."""
        unique = list({id(s): s for _, s in sorted(stats.items())}.values())
        if not unique:
            return
        flat = torch.cat([torch.cat([s.gram.reshape(-1), s.abs_sum, torch.tensor([float(s.count)],
                                                                                  dtype=torch.float64)])
                          for s in unique]).to(self.device)
        self._all_reduce(flat, dist.ReduceOp.SUM)
        flat = flat.cpu()
        start = 0
        for s in unique:
            for tensor in (s.gram, s.abs_sum):
                tensor.copy_(flat[start:start + tensor.numel()].view_as(tensor))
                start += tensor.numel()
            s.count = int(flat[start])
            start += 1

    def average(self, tensors: dict[str, torch.Tensor]) -> None:
        """Replace each tensor by its mean over the ranks, in place (same keys on every rank)."""
        names = sorted(tensors)
        if not names:
            return
        flat = torch.cat([tensors[name].reshape(-1) for name in names]).to(self.device)
        self._all_reduce(flat, dist.ReduceOp.SUM)
        flat = flat.cpu() / self.world
        start = 0
        for name in names:
            tensors[name].copy_(flat[start:start + tensors[name].numel()].view_as(tensors[name]))
            start += tensors[name].numel()

    def owners(self, costs: Sequence[float]) -> list[int]:
        """The rank that fits each item (see :func:`assign`)."""
        return assign(costs, self.world)

    def share(self, module: nn.Module, owner: int) -> None:
        """Copy ``owner``'s parameters and buffers of ``module`` to every rank, in place."""
        for tensor in _tensors(module):
            moved = tensor.data if tensor.device == self.device else tensor.data.to(self.device)
            self._broadcast(moved, owner)
            if moved is not tensor.data:
                tensor.data.copy_(moved)

    def _all_reduce(self, tensor: torch.Tensor, op) -> None:
        self.bytes_moved += tensor.numel() * tensor.element_size()
        _collective(dist.all_reduce, tensor, op=op, group=self.group)

    def _broadcast(self, tensor: torch.Tensor, src: int) -> None:
        self.bytes_moved += tensor.numel() * tensor.element_size()
        _collective(dist.broadcast, tensor, src=dist.get_global_rank(self.group, src) if self.group else src,
                    group=self.group)


def current(group: dist.ProcessGroup | None = None) -> Collective | None:
    """The collective ``convert`` should use: ``group``, else the default
    process group when one is initialized with more than one rank, else None."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return None
    collective = Collective(group)
    return collective if collective.world > 1 else None


def step(collective: Collective | None, work: Callable[[], T]) -> T:
    """``work()`` on this rank; with a collective, every rank then learns
    whether any rank failed, and raises if one did (see :meth:`Collective.agree`)."""
    if collective is None:
        return work()
    try:
        result = work()
    except Exception as err:  # every error, so that the other ranks raise too instead of waiting
        collective.agree(err)
        raise
    collective.agree(None)
    return result


def assign(costs: Sequence[float], ranks: int) -> list[int]:
    """Longest-processing-time bin packing: the costliest item first, each to
    the least loaded rank; the most loaded rank ends within 4/3 of the optimum.

    Deterministic (ties go to the lower rank and the earlier item), so every
    rank computes the same assignment without talking to the others.
    """
    load = [0.0] * ranks
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(ranks), key=lambda r: (load[r], r))
        owner[i] = rank
        load[rank] += costs[i]
    return owner


def fitting_cost(in_features: int, out_features: int) -> float:
    """Relative cost of fitting one layer: the compensated fits and the
    whitened factorizations are dominated by (in × in) work per output row."""
    return float(in_features) * in_features * (in_features + out_features)


def _tensors(module: nn.Module) -> Iterable[torch.Tensor]:
    # Parameters and every buffer (persistent or not), in registration order: the same on every rank.
    yield from module.parameters()
    yield from module.buffers()


def _collective(fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except RuntimeError as err:
        raise RankFailed(f"a collective of the distributed conversion failed ({err}); another rank probably "
                         "died or stopped answering within the process group's timeout (init_process_group("
                         "timeout=...)); see that rank's log") from err
