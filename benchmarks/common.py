"""Shared by the benchmark scripts: layer latency, markdown tables and results on disk."""
from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path

import torch
from torch import nn

from reparam.bench import compare_latency

RESULTS = Path(__file__).parent / "results"


def relative_latency(make_layer, shapes, tokens, **timing) -> dict[int, float]:
    """Median over ``shapes`` ((in, out) pairs) of ``make_layer(dense)`` / dense
    ``nn.Linear`` latency, timed side by side, for each token count."""
    relative = {}
    for count in tokens:
        ratios = []
        for in_features, out_features in shapes:
            dense = nn.Linear(in_features, out_features)
            layer = make_layer(dense)
            x = torch.randn(count, in_features)
            times = compare_latency({"dense": lambda: dense(x), "compressed": lambda: layer(x)}, **timing)
            ratios.append(times["compressed"] / times["dense"])
        relative[count] = sorted(ratios)[len(ratios) // 2]
    return relative


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown_table(rows: list[dict]) -> str:
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[k]) for k in head) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_results(name: str, rows: list[dict], command: str, notes: str = "") -> str:
    """Write ``results/<name>.json`` and ``.md`` (with the machine and the commit); returns the table."""
    RESULTS.mkdir(exist_ok=True)
    table = markdown_table(rows)
    context = {"command": command, "commit": commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
               "torch": torch.__version__}
    (RESULTS / f"{name}.json").write_text(json.dumps({**context, "rows": rows}, indent=1))
    header = "\n".join(f"- {k}: `{v}`" if k == "command" else f"- {k}: {v}" for k, v in context.items())
    (RESULTS / f"{name}.md").write_text(f"# {name}\n\n{header}\n\n{table}\n\n{notes}".rstrip() + "\n")
    return table


def interleaved_runs(arms: dict, seeds: int, run) -> dict[str, list]:
    """``run(arm, seed)`` for every arm and seed, arms interleaved within each
    seed so that load on a shared machine hits them alike."""
    results = {name: [] for name in arms}
    for seed in range(seeds):
        for name, arm in arms.items():
            results[name].append(run(arm, seed))
    return results
