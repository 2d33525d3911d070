"""SmolLM2 conversion wall time, 1 process versus 2 (torchrun, gloo, 1 thread
each), the bytes the collectives moved, and the perplexity of each result.

    python benchmarks/bench_distributed.py                 # shift_add 3-bit, 32 calibration windows
    python benchmarks/bench_distributed.py --recipe '{"model.layers.*": {"method": "affine", "bits": 4}}' --repeats 2

Runs alternate (1, 2, 1, 2, ...) so that load on a shared machine hits both alike;
each row notes the machine's 1-minute load average before and after its runs,
and the CPU time of the busiest rank (the wall time it would take with a core
per rank and nothing else running, since a rank waiting in a collective sleeps).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from common import write_results

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "distributed_convert.py"


def run(ranks: int, recipe: str, calib: int, evaluate: int) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
               str(29500 + ranks), str(EXAMPLE), "--recipe", recipe, "--calib", str(calib), "--eval", str(evaluate)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    load = os.getloadavg()[0]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "load": f"{load:.1f} → {os.getloadavg()[0]:.1f}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=json.dumps({"model.layers.*": {"method": "shift_add", "bits": 3}}))
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--eval", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default="distributed", help="results/<out>.json and .md")
    args = parser.parse_args()
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for _ in range(args.repeats):
        for ranks in (1, 2):
            runs[ranks].append(run(ranks, args.recipe, args.calib, args.eval))
            print(ranks, runs[ranks][-1], flush=True)
    rows = []
    for ranks, results in runs.items():
        seconds = statistics.median(r["convert_seconds"] for r in results)
        cpu = statistics.median(r["busiest_rank_cpu_seconds"] for r in results)
        rows.append({"processes": ranks, "threads each": 1, "convert s (median)": seconds,
                     "speedup": statistics.median(r["convert_seconds"] for r in runs[1]) / seconds,
                     "busiest rank's CPU s": cpu,
                     "CPU speedup": statistics.median(r["busiest_rank_cpu_seconds"] for r in runs[1]) / cpu,
                     "MiB moved per rank": results[0]["bytes_communicated"] / 2 ** 20,
                     "perplexity": results[0]["perplexity"], "layers": results[0]["layers"],
                     "load before → after": ", ".join(r["load"] for r in results)})
    command = "python benchmarks/bench_distributed.py " + " ".join(sys.argv[1:])
    notes = (f"Recipe: `{args.recipe}`; {args.calib} calibration windows of 256 tokens split across the ranks; "
             f"perplexity on {args.eval} evaluation windows (SmolLM2 dequantized from its Q4_1 GGUF).")
    print(write_results(args.out, rows, command.strip(), notes))


if __name__ == "__main__":
    main()
