"""Dense-sparse against low-rank on the real MiniLM, at equal bytes.

    python benchmarks/bench_dense_sparse.py

Quality: embedding fidelity with all 36 encoder Linear layers converted (128
calibration sentences, 256 held-out), both methods calibrated, at size
ratios 0.25, 0.5, 0.75, in one run. Size: bytes of those layers relative to
fp32 (values, indices and bias counted). Speed: CPU latency of each
compressed layer relative to the dense nn.Linear, median over MiniLM's three
shapes and on a 4096×4096 layer, at 1 and 128 tokens, timed side by side.
"""
from __future__ import annotations

import time

import torch
from torch import nn

import reparam
from reparam.minilm import Harness

from common import relative_latency, write_results

RATIOS = (0.25, 0.5, 0.75)
MINILM_SHAPES = ((384, 384), (384, 1536), (1536, 384))  # (in, out)
TOKENS = (1, 128)


def layer_latency(method: str, ratio: float, shapes) -> dict[int, float]:
    """Median over ``shapes`` of compressed / dense latency, per token count."""
    config = reparam.core.parse_config({"method": method, "size_ratio": ratio})
    return relative_latency(lambda dense: random_layer(dense, config), shapes, TOKENS, rounds=10)


def random_layer(dense: nn.Linear, config) -> nn.Module:
    """The compressed layer's skeleton with random contents: latency does not depend on the fit."""
    layer = reparam.core.get_method(config.method).restore(dense, config)
    with torch.no_grad():
        for name, tensor in layer.state_dict().items():
            if name == "indices":
                tensor.copy_(torch.stack([torch.randperm(layer.atoms)[:layer.nnz] for _ in range(tensor.shape[1])], 1))
            else:
                tensor.normal_()
    return layer


def main() -> None:
    torch.manual_seed(0)
    harness = Harness.build()
    rows = []
    for ratio in RATIOS:
        for method in ("low_rank", "dense_sparse"):
            model = harness.fresh_model()
            start = time.perf_counter()
            report = reparam.convert(model, {harness.layers: {"method": method, "size_ratio": ratio}},
                                     calib=harness.calib, progress=False)
            seconds = time.perf_counter() - start
            minilm = layer_latency(method, ratio, MINILM_SHAPES)
            large = layer_latency(method, ratio, ((4096, 4096),))
            rows.append({"method": method, "size_ratio": ratio,
                         "fidelity": round(harness.fidelity(model), 4),
                         "bytes vs fp32": round(report.bytes_after / report.bytes_before, 4),
                         "convert s": round(seconds, 1),
                         "MiniLM latency, 1 token": round(minilm[1], 2),
                         "MiniLM latency, 128 tokens": round(minilm[128], 2),
                         "4096² latency, 1 token": round(large[1], 2),
                         "4096² latency, 128 tokens": round(large[128], 2)})
            print(rows[-1], flush=True)
    print(write_results("dense_sparse", rows, "python benchmarks/bench_dense_sparse.py",
                        f"Latency: compressed / dense nn.Linear on CPU ({torch.get_num_threads()} threads); MiniLM: "
                        "median over its three layer shapes. Convert: wall time for all 36 layers, calibration "
                        "included."))


if __name__ == "__main__":
    main()
