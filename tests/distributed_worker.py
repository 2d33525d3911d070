"""One rank of a gloo process group, run as a script by tests/test_distributed.py
(a script, not an import: spawned processes cannot import pytest's test modules).

    python distributed_worker.py SCENARIO RANK WORLD FOLDER
"""
import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from safetensors.torch import save_file

import reparam
from reparam.core.stats import LayerStats
from reparam.distributed import Collective, RankFailed


def stats(rank, world, folder):
    x = torch.randn(96, 12, generator=torch.Generator().manual_seed(0))
    shard = x[rank::world]
    own, shared = LayerStats.from_inputs(shard), LayerStats.from_inputs(shard[:, :8])
    collective = Collective()
    collective.reduce_stats({"a": own, "b": shared, "c": shared})  # b and c share one object
    save_file({"a": own.gram, "a_abs": own.abs_sum, "b": shared.gram, "count": torch.tensor([own.count, shared.count])},
              os.path.join(folder, f"stats{rank}.safetensors"))
    _report(folder, rank, {"bytes_moved": collective.bytes_moved})


def agree(rank, world, folder):
    collective = Collective()
    try:
        collective.agree(ValueError("bad calibration batch on rank 1") if rank == 1 else None)
    except RankFailed as err:
        _report(folder, rank, {"raised": "RankFailed", "message": str(err)})
    except ValueError as err:
        _report(folder, rank, {"raised": "ValueError", "message": str(err)})


def dies(rank, world, folder):
    collective = Collective()
    if rank == 1:
        os._exit(3)
    start = time.perf_counter()
    try:
        collective.agree(None)
    except RankFailed as err:
        _report(folder, rank, {"raised": "RankFailed", "message": str(err), "seconds": time.perf_counter() - start})


RECIPE = {"encoder.*": {"method": "low_rank", "size_ratio": 0.5}}


def convert(rank, world, folder):
    """MiniLM converted with each rank calibrating on its own shard of the sentences."""
    from reparam.minilm import Harness

    harness = Harness.build(n_calib=64, n_heldout=8)
    model = harness.fresh_model()
    report = reparam.convert(model, RECIPE, calib=harness.calib[rank::world], progress=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(folder, f"model{rank}.safetensors"))
    reparam.save(model, os.path.join(folder, f"saved{rank}.safetensors"))  # only rank 0 writes
    _report(folder, rank, {"communicated": report.communicated, "layers": len(report.layers)})


def convert_fails(rank, world, folder):
    """Rank 1's third fit raises: every rank must raise and restore its model."""
    from reparam.methods.low_rank import LowRankLinear
    from reparam.minilm import Harness

    harness = Harness.build(n_calib=64, n_heldout=8)
    model, original = harness.fresh_model(), harness.fresh_model()
    if rank == 1:
        fit, calls = LowRankLinear.fit, []

        def failing_fit(self, weight, stats):
            calls.append(1)
            if len(calls) == 3:
                raise FloatingPointError("injected failure in the third fit on rank 1")
            return fit(self, weight, stats)

        LowRankLinear.fit = failing_fit
    try:
        reparam.convert(model, RECIPE, calib=harness.calib[rank::world], progress=False)
    except (FloatingPointError, RankFailed) as err:
        state, before = model.state_dict(), original.state_dict()
        restored = (list(state) == list(before) and all(torch.equal(state[k], before[k]) for k in state)
                    and [type(m) for m in model.modules()] == [type(m) for m in original.modules()])
        _report(folder, rank, {"raised": type(err).__name__, "message": str(err), "restored": restored})


def split_rows(rank, world, folder):
    """A one-layer model: its layer costs more than a rank's fair share, so every rank fits a slice of its rows."""
    from reparam.core.registry import get_method, parse_config

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 91))  # 91 rows: slices of 46 and 45
    unsplit = torch.nn.Linear(64, 91)
    unsplit.load_state_dict(model[0].state_dict())
    shard = list(torch.randn(4, 32, 64)[rank::world])
    recipe = {"0": {"method": "affine", "bits": 3, "group_size": 32}}
    share_rows, slices = Collective.share_rows, []
    Collective.share_rows = lambda self, module, part, dims: slices.append(part.out_features) or \
        share_rows(self, module, part, dims)
    report = reparam.convert(model, recipe, calib=shard, progress=False)
    # The same statistics the conversion reduced (summed batch by batch, then over the ranks), fitted whole.
    stats = LayerStats.empty(64)
    for batch in shard:
        stats.add(batch)
    Collective().reduce_stats({"0": stats})
    whole = get_method("affine").apply(unsplit, parse_config(recipe["0"]), stats)
    save_file({"split": model[0].weight, "whole": whole.weight},
              os.path.join(folder, f"split{rank}.safetensors"))
    _report(folder, rank, {"slices": slices, "error": report.layers[0].output_error,
                           "whole_error": stats.output_error(unsplit.weight, whole.weight)})


def _report(folder, rank, values):
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as file:
        json.dump(values, file)


if __name__ == "__main__":
    scenario, rank, world, folder = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(folder, 'rendezvous')}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=20))
    try:
        globals()[scenario](rank, world, folder)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
