"""Shift-add against affine quantization on the real MiniLM, and CPU latency.

    python benchmarks/bench_shift_add.py

Quality: embedding fidelity with all 36 encoder Linear layers quantized (128
calibration sentences, 256 held-out), for shift_add and affine at 2, 3 and 4
bits, round-to-nearest and calibrated (GPTQ-style) fits, plus affine with
group 64, which stores as many bytes per weight as shift_add at 3 and 4 bits,
and shift_add with bits chosen per layer for an average of 2.5. Bits per
weight count everything the layers store except the bias.

Speed: a 3-bit ShiftAddLinear against the dense fp32 nn.Linear at 1 and 128
tokens, for MiniLM's shapes and two LLM shapes, timed side by side.
"""
from __future__ import annotations

import torch
from torch import nn

import reparam
from reparam.bench import compare_latency
from reparam.minilm import Harness

from common import write_results

SHAPES = ((384, 384), (384, 1536), (1536, 384), (4096, 4096), (4096, 11008))  # (in, out)
TOKENS = (1, 128)


def quality_rows(harness: Harness) -> list[dict]:
    configs = []
    for bits in (2, 3, 4):
        configs += [{"method": "affine", "bits": bits, "fit": "rtn"},
                    {"method": "affine", "bits": bits, "fit": "gptq"},
                    {"method": "affine", "bits": bits, "fit": "gptq", "group_size": 64},
                    {"method": "shift_add", "bits": bits, "fit": "rtn"},
                    {"method": "shift_add", "bits": bits, "fit": "gptq"}]
    configs.append({"method": "shift_add", "bits": "auto", "target_bits": 2.5, "fit": "gptq"})
    rows = []
    for config in configs:
        model = harness.fresh_model()
        reparam.convert(model, {harness.layers: config}, calib=harness.calib, progress=False)
        layers = [m for m in model.modules() if isinstance(m, reparam.core.quantized.QuantizedLinear)]
        weights = sum(m.in_features * m.out_features for m in layers)
        stored = sum(m.planes.numel() * m.planes.element_size() + m.params.numel() * m.params.element_size()
                     for m in layers)
        rows.append({"method": config["method"], "fit": config["fit"], "bits": config["bits"],
                     "group": config.get("group_size", 128),
                     "bits per weight": round(8 * stored / weights, 3),
                     "fidelity": round(harness.fidelity(model), 4)})
        print(rows[-1], flush=True)
    return rows


def latency_rows() -> list[dict]:
    rows = []
    for in_features, out_features in SHAPES:
        dense = nn.Linear(in_features, out_features)
        layer = random_shift_add(dense)
        row = {"shape (in, out)": f"{in_features}x{out_features}",
               "bytes vs fp32": round(reparam.core.state_nbytes(layer) / reparam.core.state_nbytes(dense), 3)}
        for tokens in TOKENS:
            x = torch.randn(tokens, in_features)
            times = compare_latency({"dense": lambda: dense(x), "shift_add": lambda: layer(x)}, rounds=10)
            row[f"latency vs dense, {tokens} token{'s' if tokens > 1 else ''}"] = round(
                times["shift_add"] / times["dense"], 2)
        rows.append(row)
        print(row, flush=True)
    return rows


def random_shift_add(dense: nn.Linear) -> reparam.ShiftAddLinear:
    """A 3-bit layer with random codes and scales: latency does not depend on the fit."""
    layer = reparam.ShiftAddLinear.empty_like(dense, reparam.ShiftAddConfig(bits=3))
    layer.planes.random_(0, 256)
    layer.params.uniform_(0.001, 0.01)
    layer.bias.data.copy_(dense.bias)
    return layer


def main() -> None:
    torch.manual_seed(0)
    quality = quality_rows(Harness.build())
    latency = latency_rows()
    command = "python benchmarks/bench_shift_add.py"
    print(write_results("shift_add", quality, command, "Bits per weight: bit-planes and fp16 group parameters, "
                        "bias excluded. Fidelity: mean cosine to the original embeddings, 256 held-out sentences."))
    print(write_results("shift_add_latency", latency, command,
                        f"CPU, {torch.get_num_threads()} threads; 3-bit, group 128. 1 token runs the LUT path, "
                        "128 tokens decode-and-matmul."))


if __name__ == "__main__":
    main()
