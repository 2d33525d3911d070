"""How long the fits take, and what they give, on the real models.

    python benchmarks/bench_fit.py --model minilm [--label after] [--threads 2] [--methods "shift_add 3" ...]
    python benchmarks/bench_fit.py --model smollm2 --methods "shift_add 3" "dense_sparse 0.5"
    python benchmarks/bench_fit.py --model data-free

- minilm: ``reparam.convert`` of all 36 encoder Linear layers with 128
  calibration sentences (statistics included in the time); fidelity on 256
  held-out sentences (``reparam.minilm.Harness``).
- smollm2: all 210 block Linear layers of SmolLM2-135M (``reparam.llm.Harness``:
  32 calibration windows of 256 tokens, perplexity on 40 held-out windows);
  the GGUF stores the weights as Q4_1, dequantized on load.
- data-free: ``reparam.apply`` of shift_add 3-bit to one nn.Linear(4096, 4096).

Rows are merged into ``results/fit.json`` by (label, model, method), so runs
of the old code (``--label before`` with PYTHONPATH pointing at it) and the
new one end up in one table.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from torch import nn

import reparam

from common import RESULTS, write_results

METHODS = {
    "shift_add 2": {"method": "shift_add", "bits": 2},
    "shift_add 3": {"method": "shift_add", "bits": 3},
    "shift_add 4": {"method": "shift_add", "bits": 4},
    "affine 4 gptq": {"method": "affine", "bits": 4, "fit": "gptq"},
    "affine 3 gptq": {"method": "affine", "bits": 3, "fit": "gptq"},
    "low_rank 0.5": {"method": "low_rank", "size_ratio": 0.5},
    "dense_sparse 0.5": {"method": "dense_sparse", "size_ratio": 0.5},
}


def harness(model: str):
    if model == "minilm":
        from reparam.minilm import Harness
        built = Harness.build()
        return built, "fidelity", built.fidelity
    from reparam.llm import Harness
    built = Harness.build()
    return built, "perplexity", built.perplexity


def model_rows(model: str, methods: list[str], label: str, save) -> list[dict]:
    """One row per method; ``save(rows)`` after each, so a long run keeps what it measured."""
    built, metric, measure = harness(model)
    rows = []
    for name in methods:
        network = built.fresh_model()
        start = time.perf_counter()
        reparam.convert(network, {built.layers: METHODS[name]}, calib=built.calib, progress=False)
        seconds = time.perf_counter() - start
        rows.append({"label": label, "model": model, "method": name, "seconds": round(seconds, 1),
                     "quality": f"{metric} {measure(network):.4f}"})
        print(rows[-1], flush=True)
        save(rows)
    return rows


def data_free_rows(label: str) -> list[dict]:
    torch.manual_seed(0)
    linear = nn.Linear(4096, 4096)
    start = time.perf_counter()
    layer = reparam.apply(linear, {"method": "shift_add", "bits": 3})
    seconds = time.perf_counter() - start
    weight = linear.weight.detach().double()
    error = float((layer.weight.detach().double() - weight).norm() / weight.norm())
    return [{"label": label, "model": "Linear(4096, 4096), data-free", "method": "shift_add 3",
             "seconds": round(seconds, 1), "quality": f"relative weight error {error:.4f}"}]


def merged(rows: list[dict]) -> list[dict]:
    """Earlier rows of ``results/fit.json`` with the new ones replacing those with the same key."""
    path = RESULTS / "fit.json"
    earlier = json.loads(path.read_text())["rows"] if path.exists() else []
    key = lambda row: (row["label"], row["model"], row["method"])  # noqa: E731
    new = {key(row) for row in rows}
    return sorted([row for row in earlier if key(row) not in new] + rows,
                  key=lambda row: (row["model"], row["method"], row["label"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("minilm", "smollm2", "data-free"), default="minilm")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--label", default="after", help="which code this run measures, e.g. before / after")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    command = " ".join(["python benchmarks/bench_fit.py"] + sys.argv[1:])
    notes = ("seconds: wall time of reparam.convert (calibration statistics included) or reparam.apply, "
             "on a 2-core machine shared with other jobs; label 'before' is the code before the fast fits. "
             "SmolLM2's weights were stored as Q4_1 in its GGUF and are dequantized on load.")

    def save(rows: list[dict]) -> str:
        return write_results("fit", merged([{**row, "threads": args.threads} for row in rows]), command, notes)

    if args.model == "data-free":
        print(save(data_free_rows(args.label)))
    else:
        print(save(model_rows(args.model, args.methods, args.label, save)))


if __name__ == "__main__":
    main()
