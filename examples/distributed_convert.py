"""Convert SmolLM2-135M across processes with torch.distributed (gloo on CPU).

    torchrun --nproc-per-node 2 examples/distributed_convert.py
    torchrun --nproc-per-node 2 examples/distributed_convert.py --recipe '{"model.layers.*": {"method": "affine", "bits": 4}}'
    # across machines: the same command on each, with --nnodes, --node-rank and --rdzv-endpoint (docs/distributed.md)

Each rank calibrates on its own shard of the calibration windows; statistics
are all-reduced, each rank fits its share of every block's layers, and the
fitted tensors are broadcast, so every rank ends with the same model. Rank 0
prints the report, saves (save_pretrained) and measures perplexity; the last
line is JSON (used by benchmarks/bench_distributed.py).
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist

import reparam
from reparam.kernels.extension import compiled_ops
from reparam.llm import Harness

DEFAULT_RECIPE = {"model.layers.*": {"method": "shift_add", "bits": 3}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=json.dumps(DEFAULT_RECIPE), help="a JSON recipe or a recipe file")
    parser.add_argument("--calib", type=int, default=32, help="calibration windows, split across the ranks")
    parser.add_argument("--eval", type=int, default=40, help="evaluation windows (rank 0)")
    parser.add_argument("--save", help="directory for save_pretrained (rank 0 writes)")
    args = parser.parse_args()
    torch.manual_seed(0)
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        harness = Harness.build(n_calib=args.calib, n_heldout=args.eval)
        model = harness.fresh_model()
        recipe = json.loads(args.recipe) if args.recipe.lstrip().startswith("{") else args.recipe
        compiled_ops()  # build the CPU kernels the converted blocks run on now (once per machine), not while timed
        dist.barrier()  # time the conversion alone, every rank loaded
        start, cpu_start = time.perf_counter(), time.process_time()
        report = reparam.convert(model, recipe, calib=harness.calib[rank::world], progress=rank == 0)
        seconds = time.perf_counter() - start
        # CPU time of the busiest rank: what the wall time would be with a core per rank and nothing else
        # running (waiting in a collective sleeps), so it shows the speedup a loaded machine hides.
        cpu = torch.tensor([time.process_time() - cpu_start], dtype=torch.float64)
        dist.all_reduce(cpu, dist.ReduceOp.MAX)
        if rank == 0:
            print(report)
            if args.save:
                model.save_pretrained(args.save)
            result = {"ranks": world, "threads": torch.get_num_threads(), "convert_seconds": round(seconds, 1),
                      "busiest_rank_cpu_seconds": round(float(cpu), 1),
                      "bytes_communicated": report.communicated, "layers": len(report.layers),
                      "perplexity": harness.perplexity(model) if args.eval else None}
            print(json.dumps(result))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
