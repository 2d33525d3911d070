"""Time of one layer's compensated (GPTQ) fit per layer shape, at 1 thread:
the data behind ``QuantizedConfig.fitting_cost`` (docs/distributed.md).

    python benchmarks/bench_fit_cost.py --method affine --bits 4
    python benchmarks/bench_fit_cost.py --method shift_add --bits 3
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from common import write_results
from reparam.core.registry import get_method, parse_config
from reparam.core.stats import LayerStats

SHAPES = [(576, 192), (576, 288), (576, 576), (576, 768), (576, 1536), (1536, 288), (1536, 576)]  # (in, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="affine")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    config = parse_config({"method": args.method, "bits": args.bits})
    method = get_method(args.method)
    # Inputs with channels of unequal scale, as activations have.
    stats = {n: LayerStats.from_inputs(torch.randn(2048, n, generator=generator) * 3 * torch.rand(n, generator=generator))
             for n in {i for i, _ in SHAPES}}
    layers = {shape: nn.Linear(*shape) for shape in SHAPES}
    seconds = {shape: [] for shape in SHAPES}
    for _ in range(args.repeats):  # shapes interleaved, so load hits all alike
        for shape in SHAPES:
            start = time.perf_counter()
            method.apply(layers[shape], config, stats[shape[0]])
            seconds[shape].append(time.perf_counter() - start)
    rows = [{"in": i, "out": o, "fit s (fastest)": min(seconds[(i, o)]),
             "model s": None, "all runs": " ".join(f"{t:.3f}" for t in seconds[(i, o)])} for i, o in SHAPES]
    # Least squares of time = a·in³ + b·in·out, the form of fitting_cost: in·(in² + (b/a)·out).
    design = torch.tensor([[float(i) ** 3, float(i) * o] for i, o in SHAPES], dtype=torch.float64)
    fastest = torch.tensor([[r["fit s (fastest)"]] for r in rows], dtype=torch.float64)
    a, b = torch.linalg.lstsq(design, fastest).solution[:, 0].tolist()
    for row, fit in zip(rows, (design @ torch.tensor([a, b], dtype=torch.float64)).tolist()):
        row["model s"] = fit
    notes = (f"{args.method} {args.bits}-bit, compensated fit, 1 thread. Least squares: time ≈ {a:.3g}·in³ + "
             f"{b:.3g}·in·out, i.e. in·(in² + {b / a:.0f}·out) × {a:.3g} s; config's ROW_FIT_COST = "
             f"{config.ROW_FIT_COST:g}.")
    command = f"python benchmarks/bench_fit_cost.py --method {args.method} --bits {args.bits}"
    print(write_results(f"fit_cost_{args.method}", rows, command, notes))


if __name__ == "__main__":
    main()
