"""Sequential (block-by-block) versus one-pass calibration, same recipe, same data.

MiniLM: embedding fidelity; SmolLM2-135M: perplexity (its GGUF weights were
stored as Q4_1 and are dequantized on load; "dense" is that model).

    OMP_NUM_THREADS=1 python benchmarks/study_sequential.py --model minilm --method affine-3
    OMP_NUM_THREADS=1 python benchmarks/study_sequential.py --model smollm2 --method affine-4 --calib 16 --windows 20
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

import torch

import reparam

RECIPES = {
    "affine-4": {"method": "affine", "bits": 4, "group_size": 64, "fit": "gptq"},
    "affine-3": {"method": "affine", "bits": 3, "group_size": 64, "fit": "gptq"},
    "shift_add-3": {"method": "shift_add", "bits": 3, "group_size": 64},
    "low_rank-0.8": {"method": "low_rank", "size_ratio": 0.8, "factorizer": "whitened"},
}
RESULTS = pathlib.Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["minilm", "smollm2"], required=True)
    parser.add_argument("--method", choices=sorted(RECIPES), default="affine-4")
    parser.add_argument("--calib", type=int, default=None, help="calibration windows / sentences")
    parser.add_argument("--windows", type=int, default=None, help="evaluation windows / sentences")
    args = parser.parse_args()
    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "1")))
    if args.model == "minilm":
        from reparam import minilm
        harness = minilm.Harness.build(**{k: v for k, v in (("n_calib", args.calib), ("n_heldout", args.windows))
                                          if v is not None})
        score, name = harness.fidelity, "fidelity"
    else:
        from reparam import llm
        harness = llm.Harness.build(**{k: v for k, v in (("n_calib", args.calib), ("n_heldout", args.windows))
                                       if v is not None})
        score, name = harness.perplexity, "perplexity"
    rows = []
    if args.model == "smollm2":
        rows.append({"pipeline": "dense", name: score(harness.fresh_model())})
        print(rows[-1], flush=True)
    for pipeline in ("one_pass", "sequential"):
        model = harness.fresh_model()
        start = time.perf_counter()
        reparam.convert(model, {harness.layers: RECIPES[args.method]}, calib=harness.calib, pipeline=pipeline,
                        progress=False)
        seconds = time.perf_counter() - start
        rows.append({"pipeline": pipeline, name: score(model), "convert_s": round(seconds, 1)})
        print(rows[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"study_sequential_{args.model}_{args.method}.json"
    out.write_text(json.dumps({"model": args.model, "method": RECIPES[args.method], "calib": args.calib,
                               "windows": args.windows, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
