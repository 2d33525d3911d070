"""dense_sparse's whitened fit with the compiled code step against its torch
definition, side by side on one real SmolLM2 block (docs/kernels.md,
"Fitting: dense_sparse's column codes").

    python benchmarks/bench_sparse_code.py [--block 3] [--calib 8] [--threads 1]

Each of the block's seven layers is fitted at size_ratio 0.8 with the
compiled op and with the torch loop (``Compensation.run`` calling
``sparse_code_column_reference``), interleaved; the fitted weights must
agree (same supports, float error) and the times are printed with their ratio.
"""
from __future__ import annotations

import argparse
import time
from unittest import mock

import torch

from reparam import llm
from reparam.calibration import StatsCollector
from reparam.core.registry import get_method, parse_config

from common import write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--block", type=int, default=3)
    parser.add_argument("--calib", type=int, default=8, help="calibration windows of 256 tokens")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size-ratio", type=float, default=0.8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    harness = llm.Harness.build(n_calib=args.calib, n_heldout=1)
    model = harness.fresh_model()
    prefix = f"model.layers.{args.block}."
    layers = {name: module for name, module in model.named_modules()
              if name.startswith(prefix) and isinstance(module, torch.nn.Linear)}
    with StatsCollector(layers) as collector, torch.no_grad():
        for window in harness.calib:
            collector.start_batch()
            model(window)
    stats = collector.stats()
    method = get_method("dense_sparse")
    config = parse_config({"method": "dense_sparse", "size_ratio": args.size_ratio})

    def fit(layer, name):
        start = time.perf_counter()
        fitted = method.apply(layer, config, stats[name])
        return time.perf_counter() - start, fitted.weight.detach()

    rows = []
    for name, layer in layers.items():
        compiled_s, compiled_w = fit(layer, name)
        with mock.patch("reparam.kernels.sparse_code.compiled_ops", lambda: None):  # the torch loop
            torch_s, torch_w = fit(layer, name)
        difference = float((compiled_w - torch_w).norm() / torch_w.norm())
        rows.append({"layer": name[len(prefix):], "compiled_s": round(compiled_s, 2), "torch_s": round(torch_s, 2),
                     "speedup": round(torch_s / compiled_s, 2), "relative_difference": f"{difference:.1e}"})
        print(rows[-1], flush=True)
    total_compiled, total_torch = sum(r["compiled_s"] for r in rows), sum(r["torch_s"] for r in rows)
    rows.append({"layer": "block", "compiled_s": round(total_compiled, 1), "torch_s": round(total_torch, 1),
                 "speedup": round(total_torch / total_compiled, 2), "relative_difference": "-"})
    print(rows[-1])
    command = (f"python benchmarks/bench_sparse_code.py --block {args.block} --calib {args.calib} "
               f"--threads {args.threads} --size-ratio {args.size_ratio}")
    print(write_results("sparse_code", rows, command))


if __name__ == "__main__":
    main()
