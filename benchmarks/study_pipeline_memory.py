"""Peak RSS of the conversion pipeline itself on SmolLM2-135M: statistics,
cached block inputs, hooks, with every fit replaced by a no-op so that only
the pipeline's memory shows. Each pipeline runs in its own subprocess.

    OMP_NUM_THREADS=1 python benchmarks/study_pipeline_memory.py --calib 16
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def worker(pipeline: str, calib: int) -> dict:
    import gc

    import psutil
    import torch

    import reparam
    from reparam import llm
    from reparam.methods.low_rank import LowRankLinear
    from bench_llm import PeakRss

    torch.set_num_threads(1)
    LowRankLinear.fit = lambda self, weight, stats: None  # the pipeline's memory only
    harness = llm.Harness.build(n_calib=calib, n_heldout=1)
    model = harness.fresh_model()
    gc.collect()
    loaded = psutil.Process().memory_info().rss
    with PeakRss() as peak:
        start = time.perf_counter()
        reparam.convert(model, {harness.layers: {"method": "low_rank", "rank": 8, "factorizer": "whitened"}},
                        calib=harness.calib, pipeline=pipeline, progress=False)
    return {"pipeline": pipeline, "loaded_rss_mib": round(loaded / 2**20),
            "peak_over_loaded_mib": round((peak.peak - loaded) / 2**20), "seconds": round(time.perf_counter() - start)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib", type=int, default=16, help="calibration windows of 256 tokens")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.calib)))
        return
    for pipeline in ("one_pass", "sequential_dense"):
        done = subprocess.run([sys.executable, __file__, "--worker", pipeline, "--calib", str(args.calib)],
                              capture_output=True, text=True, check=True)
        print(done.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
