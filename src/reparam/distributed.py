"""Conversion across processes and machines with ``torch.distributed``.

When ``convert`` runs inside an initialized default process group (torchrun,
gloo on CPU, NCCL on CUDA), or is given one, every rank passes its own shard
of the calibration data and the ranks work in lockstep:

- statistics (Gram matrices, channel sums, token counts) are all-reduced,
  so every rank holds those of all the data;
- the layers of a block (or of the whole model, in one pass) are assigned to
  ranks by their estimated fitting cost (longest-processing-time bin packing);
  a layer that alone costs more than a rank's fair share, and whose method
  fits output rows independently, is split instead where that lowers the
  busiest rank's load: every rank fits a slice of its rows;
- each rank fits its layers (and slices), then every fitted layer's tensors
  are broadcast from the rank that fitted them, so all ranks end with the
  identical model; output errors are measured where the rows were fitted and
  summed in one all-reduce;
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
from typing import Callable, Iterable, Mapping, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .core.stats import LayerStats

T = TypeVar("T")
MESSAGE_BYTES = 2048  # room for an error message sent to the other ranks
SPLIT = -1  # the owner of a layer whose rows every rank fits a slice of (see ``assign``)


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
        """Sum every rank's statistics in place (layers sharing one object are reduced once).

        A Gram matrix is symmetric: only its upper triangle is sent, and the
        sum is mirrored into the lower one (half the bytes)."""
        unique = list({id(s): s for _, s in sorted(stats.items())}.values())
        if not unique:
            return
        upper = {n: torch.triu_indices(n, n) for n in {s.gram.shape[0] for s in unique}}
        flat = torch.cat([torch.cat([s.gram[tuple(upper[s.gram.shape[0]])], s.abs_sum,
                                     torch.tensor([float(s.count)], dtype=torch.float64)])
                          for s in unique]).to(self.device)
        self._all_reduce(flat, dist.ReduceOp.SUM)
        flat = flat.cpu()
        start = 0
        for s in unique:
            rows, cols = upper[s.gram.shape[0]]
            triangle = flat[start:start + rows.numel()]
            s.gram[rows, cols] = triangle
            s.gram[cols, rows] = triangle
            start += rows.numel()
            s.abs_sum.copy_(flat[start:start + s.abs_sum.numel()])
            start += s.abs_sum.numel()
            s.count = int(flat[start])
            start += 1

    def average(self, tensors: dict[str, torch.Tensor]) -> None:
        """Replace each tensor by its mean over the ranks, in place (same keys on every rank)."""
        names = sorted(tensors)
        if names:
            mean = self.sum(torch.cat([tensors[name].reshape(-1) for name in names])) / self.world
            for name, part in zip(names, mean.split([tensors[name].numel() for name in names])):
                tensors[name].copy_(part.view_as(tensors[name]))

    def owners(self, costs: Sequence[float], slice_costs: Sequence[float | None]) -> list[int]:
        """The rank that fits each item, or ``SPLIT`` (see :func:`assign`)."""
        return assign(costs, self.world, slice_costs)

    def rows(self, count: int, rank: int | None = None) -> slice:
        """The output rows of a split layer with ``count`` rows that ``rank`` (default: this one) fits."""
        return row_slices(count, self.world)[self.rank if rank is None else rank]

    def share(self, module: nn.Module, owner: int) -> None:
        """Copy ``owner``'s parameters and buffers of ``module`` to every rank, in place."""
        for tensor in _tensors(module):
            moved = tensor.data if tensor.device == self.device else tensor.data.to(self.device)
            self._broadcast(moved, owner)
            if moved is not tensor.data:
                tensor.data.copy_(moved)

    def share_rows(self, module: nn.Module, part: nn.Module, row_dims: Mapping[str, int]) -> None:
        """Fill ``module`` (a skeleton with ``out_features`` rows) on every rank
        from the row slices the ranks fitted (``part``: this rank's, fitted on
        ``rows()``), along the dimension ``row_dims`` gives for each tensor."""
        tensors, mine = _named_tensors(module), _named_tensors(part)
        unknown = sorted(set(tensors) - set(row_dims))
        if unknown:
            raise ValueError(f"{type(module).__name__}.ROW_DIMS does not say which dimension of {unknown} holds "
                             "the output rows; add them, or set ROW_DIMS = None if the rows are fitted jointly")
        for rank in range(self.world):
            rows = self.rows(module.out_features, rank)
            for name, tensor in tensors.items():
                target = tensor.data.narrow(row_dims[name], rows.start, rows.stop - rows.start)
                piece = (mine[name].data.to(self.device).contiguous() if rank == self.rank else
                         torch.empty(target.shape, dtype=target.dtype, device=self.device))
                self._broadcast(piece, rank)
                target.copy_(piece)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the ranks (a new CPU tensor)."""
        total = values.to(self.device, copy=True)
        self._all_reduce(total, dist.ReduceOp.SUM)
        return total.cpu()

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


def assign(costs: Sequence[float], ranks: int, slice_costs: Sequence[float | None] | None = None) -> list[int]:
    """The rank that fits each item, or ``SPLIT`` for an item every rank fits a row slice of.

    Items are packed longest processing time first: the costliest to the
    least loaded rank (within 4/3 of the optimum). An item costlier than a
    rank's fair share (the total over ``ranks``) keeps the other ranks
    waiting; where its rows can be fitted apart (``slice_costs[i]``, the cost
    of one of ``ranks`` row slices, is not None), the packing is tried with
    such items split, each rank carrying a slice, and kept if its most loaded
    rank finishes sooner. A slice repeats what every slice needs (e.g. the
    Hessian's factorization), so splitting does not always pay.

    Deterministic (ties go to the lower rank, the earlier item, and not
    splitting), so every rank computes the same assignment without talking to
    the others.
    """
    slice_costs = slice_costs or [None] * len(costs)
    fair = sum(costs) / ranks
    heavy = {i for i, (cost, part) in enumerate(zip(costs, slice_costs)) if part is not None and cost > fair}
    whole, whole_load = _pack(costs, ranks, set(), slice_costs)
    if ranks == 1 or not heavy:
        return whole
    split, split_load = _pack(costs, ranks, heavy, slice_costs)
    return split if split_load < whole_load else whole


def _pack(costs: Sequence[float], ranks: int, split: set[int],
          slice_costs: Sequence[float | None]) -> tuple[list[int], float]:
    """LPT packing with the items in ``split`` on every rank: (owners, the most loaded rank's load)."""
    owner = [SPLIT if i in split else 0 for i in range(len(costs))]
    load = [sum(slice_costs[i] for i in split)] * ranks
    for i in sorted((i for i in range(len(costs)) if i not in split), key=lambda i: (-costs[i], i)):
        rank = min(range(ranks), key=lambda r: (load[r], r))
        owner[i] = rank
        load[rank] += costs[i]
    return owner, max(load)


def row_slices(count: int, ranks: int) -> list[slice]:
    """``count`` rows in ``ranks`` contiguous slices, the first ``count % ranks`` one row longer."""
    size, extra = divmod(count, ranks)
    starts = [r * size + min(r, extra) for r in range(ranks + 1)]
    return [slice(starts[r], starts[r + 1]) for r in range(ranks)]


def _tensors(module: nn.Module) -> Iterable[torch.Tensor]:
    # Parameters and every buffer (persistent or not), in registration order: the same on every rank.
    yield from module.parameters()
    yield from module.buffers()


def _named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _collective(fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except RuntimeError as err:
        raise RankFailed(f"a collective of the distributed conversion failed ({err}); another rank probably "
                         "died or stopped answering within the process group's timeout (init_process_group("
                         "timeout=...)); see that rank's log") from err
