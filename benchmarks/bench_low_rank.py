"""Low-rank on the real MiniLM: every factorizer at size ratios 0.25, 0.5, 0.75.

    python benchmarks/bench_low_rank.py

Quality: embedding fidelity with all 36 encoder Linear layers converted (128
calibration sentences, 256 held-out). Size: bytes of those layers relative to
fp32. Speed: CPU latency of a LowRankLinear relative to the dense nn.Linear
for MiniLM's three shapes, at 1 and 128 tokens, timed side by side.
"""
from __future__ import annotations

import torch

import reparam
from reparam.minilm import Harness

from common import relative_latency, write_results

RATIOS = (0.25, 0.5, 0.75)
FACTORIZERS = ("svd", "asvd", "whitened")
SHAPES = ((384, 384), (384, 1536), (1536, 384))  # (in, out) of MiniLM's encoder layers
TOKENS = (1, 128)


def layer_latency(ratio: float) -> dict[int, float]:
    """Median over MiniLM's shapes of LowRankLinear / nn.Linear latency, per token count."""
    config = reparam.LowRankConfig(size_ratio=ratio)
    return relative_latency(lambda dense: reparam.LowRankLinear.from_linear(dense, config), SHAPES, TOKENS)


def main() -> None:
    torch.manual_seed(0)
    harness = Harness.build()
    rows = []
    for ratio in RATIOS:
        latency = layer_latency(ratio)
        for factorizer in FACTORIZERS:
            model = harness.fresh_model()
            config = {"method": "low_rank", "size_ratio": ratio, "factorizer": factorizer}
            report = reparam.convert(model, {harness.layers: config}, calib=harness.calib, progress=False)
            rows.append({"factorizer": factorizer, "size_ratio": ratio,
                         "fidelity": round(harness.fidelity(model), 4),
                         "bytes vs fp32": round(report.bytes_after / report.bytes_before, 4),
                         "latency vs dense, 1 token": round(latency[1], 3),
                         "latency vs dense, 128 tokens": round(latency[128], 3)})
            print(rows[-1], flush=True)
    print(write_results("low_rank", rows, "python benchmarks/bench_low_rank.py",
                        "Latency: median over MiniLM's three layer shapes of LowRankLinear / nn.Linear."))


if __name__ == "__main__":
    main()
