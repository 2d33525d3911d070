"""Compress the real all-MiniLM-L6-v2 and print what it gained and lost.

    python examples/compress_minilm.py                     # the default recipe
    python examples/compress_minilm.py --recipe my.yaml    # your own recipe
    python examples/compress_minilm.py --save minilm.safetensors
    python examples/compress_minilm.py --no-tune           # the fits alone: faster, fidelity 0.970

Prints the per-layer report, the model's size before and after (bytes of the
saved safetensors file), embedding fidelity on held-out sentences (mean
cosine to the original model's embeddings) and CPU latency before and after,
timed side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

import reparam
from reparam.bench import compare_latency
from reparam.minilm import Harness

# All 36 encoder Linear layers as 3-bit shift-add weights (GPTQ-compensated
# binary coding, power-of-two scales): about a tenth of their fp32 bytes, the
# best fidelity per byte of the single methods (docs/which_method.md), and a
# compiled CPU kernel that beats the dense layers at few tokens.
DEFAULT_RECIPE = {"encoder.*": {"method": "shift_add", "bits": 3}}
# Then each block's scales and codes are tuned to the original model's hidden states (reparam.tuning), on 512
# calibration sentences: tuning needs more than the fits' 128 (fidelity 0.964 with 128 and no tuning, 0.970 with
# 512, 0.978 with 512 and the scales tuned, 0.982 with the codes learned too; the same bytes, the same speed;
# docs/budget.md).
TUNING = reparam.BlockTuning(epochs=4, batches_per_step=1, codes=True)


def file_size(model: torch.nn.Module, path: str | None) -> int:
    if path:
        reparam.save(model, path)
        return os.path.getsize(path)
    with tempfile.TemporaryDirectory() as tmp:
        target = os.path.join(tmp, "model.safetensors")
        reparam.save(model, target)
        return os.path.getsize(target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", help="a YAML or JSON recipe file (default: %s)" % json.dumps(DEFAULT_RECIPE))
    parser.add_argument("--calib", type=int, default=512, help="calibration sentences")
    parser.add_argument("--no-tune", action="store_true", help="skip block-output tuning after the fits")
    parser.add_argument("--save", help="also write the compressed model to this safetensors file")
    args = parser.parse_args()
    torch.manual_seed(0)

    print("Loading all-MiniLM-L6-v2 and real sentences from the Python docs ...")
    harness = Harness.build(n_calib=args.calib)
    original, model = harness.fresh_model(), harness.fresh_model()

    start = time.perf_counter()
    report = reparam.convert(model, args.recipe or DEFAULT_RECIPE, calib=harness.calib,
                             tune=None if args.no_tune else TUNING)
    seconds = time.perf_counter() - start
    print(report)

    size_before, size_after = file_size(original, None), file_size(model, args.save)
    fidelity = harness.fidelity(model)
    batch = harness.heldout[0]
    sentence = {k: v[:1, :int(batch["attention_mask"][0].sum())] for k, v in batch.items()}
    latency = compare_latency({"original": lambda: original(**batch), "compressed": lambda: model(**batch)},
                              rounds=10)
    one = compare_latency({"original": lambda: original(**sentence), "compressed": lambda: model(**sentence)},
                          rounds=20)
    print(f"\nconverted {len(report.layers)} layers in {seconds:.1f} s")
    print(f"model file:  {size_before / 2**20:.1f} MiB -> {size_after / 2**20:.1f} MiB "
          f"({size_after / size_before:.3f}x)")
    print(f"converted layers: {report.bytes_before / 2**20:.1f} MiB -> {report.bytes_after / 2**20:.1f} MiB "
          f"({report.bytes_after / report.bytes_before:.3f}x)")
    print(f"embedding fidelity (mean cosine to the original, {len(harness.reference)} held-out sentences): "
          f"{fidelity:.4f}")
    for what, times in ((f"one sentence ({sentence['input_ids'].shape[1]} tokens)", one),
                        (f"a batch of {tuple(batch['input_ids'].shape)} (sentences, tokens)", latency)):
        print(f"CPU latency, {what}: {times['original'] * 1e3:.1f} ms -> {times['compressed'] * 1e3:.1f} ms "
              f"(speedup {times['original'] / times['compressed']:.2f}x)")


if __name__ == "__main__":
    main()
