"""Which per-layer error should a size budget minimize? MiniLM, one fit per candidate.

Every encoder layer is fitted once (GPTQ) with each candidate; then, for each
budget and each way of totalling the layers' errors, the knapsack
(``core.budget.choose``) picks one fit per layer and the chosen fits are
swapped in to measure embedding fidelity. Totals compared:

- "e2", "e4": Σ e² and Σ e⁴ of the relative output errors e (the report's number);
- "sensitivity": Σ_o s_o·‖(W − Ŵ)_o X‖², s the output sensitivity
  (``reparam.sensitivity``), what ``method: "auto"`` uses.

    OMP_NUM_THREADS=1 python benchmarks/study_budget_error.py
"""
from __future__ import annotations

import collections
import dataclasses

import torch

import reparam
from reparam.core.budget import Option, choose, weight_nbytes
from reparam.core.registry import get_method, parse_config
from reparam.minilm import Harness
from reparam.sensitivity import collect_sensitivity
from reparam.swap import ModuleSwaps

from common import write_results

CANDIDATES = [
    *({"method": "affine", "bits": b} for b in (2, 3, 4, 5)),
    *({"method": "affine", "bits": b, "group_size": 64} for b in (2, 3, 4)),
    *({"method": "shift_add", "bits": b} for b in (2, 3)),
]
BUDGETS = (2.3, 2.5, 3.0, 3.5)


def main() -> None:
    torch.set_num_threads(1)
    harness = Harness.build()
    model = harness.fresh_model()
    layers = {name: module for name, module in model.named_modules()
              if name.startswith("encoder.") and isinstance(module, torch.nn.Linear)}
    stats = reparam.collect_stats(model, harness.calib, layers, progress=False)
    sensitivity = collect_sensitivity(model, harness.calib, layers, progress=False)
    fits = {}  # (layer, candidate index) -> (module, bytes, e, weighted error)
    for name, module in layers.items():
        layer_stats = dataclasses.replace(stats[name], sensitivity=sensitivity[name])
        for i, candidate in enumerate(CANDIDATES):
            config = parse_config(candidate)
            new = get_method(config.method).apply(module, config, layer_stats)
            fits[name, i] = (new, weight_nbytes(new), layer_stats.output_error(module.weight, new.weight),
                             layer_stats.weighted_error(module.weight, new.weight))
    weights = sum(module.weight.numel() for module in layers.values())
    totals = {"e2": lambda f: f[2] ** 2, "e4": lambda f: f[2] ** 4, "sensitivity": lambda f: f[3]}
    rows = []
    for budget in BUDGETS:
        for total, error in totals.items():
            options = {name: [Option(i, fits[name, i][1], error(fits[name, i])) for i in range(len(CANDIDATES))]
                       for name in layers}
            chosen = {name: option.key for name, option in choose(options, int(budget * weights // 8)).items()}
            with ModuleSwaps(model) as swaps:
                for name, i in chosen.items():
                    swaps.swap(name, get_method(CANDIDATES[i]["method"]), lambda old, f=fits[name, i]: f[0])
                fidelity = harness.fidelity(model)
                swaps.undo()
            mix = collections.Counter(_label(CANDIDATES[i]) for i in chosen.values())
            rows.append({"budget (bits/weight)": budget, "total": total,
                         "bits/weight": round(8 * sum(fits[n, i][1] for n, i in chosen.items()) / weights, 3),
                         "fidelity": round(fidelity, 4), "choice": ", ".join(f"{k} ×{v}" for k, v in mix.most_common())})
            print(rows[-1], flush=True)
    write_results("study_budget_error", rows, "OMP_NUM_THREADS=1 python benchmarks/study_budget_error.py",
                  notes="MiniLM, 36 encoder layers, 128 calibration and 256 held-out sentences; every candidate "
                        "fitted once with its real (GPTQ) fit.")


def _label(candidate: dict) -> str:
    group = f" g{candidate['group_size']}" if "group_size" in candidate else ""
    return f"{candidate['method']} {candidate['bits']}b{group}"


if __name__ == "__main__":
    main()
