"""Fine-tune a dense-sparse MiniLM with the Straight-Through Factorizer (STF).

    python examples/finetune_dense_sparse.py [--steps 200] [--size-ratio 0.5]

Converts all 36 encoder Linear layers of all-MiniLM-L6-v2 to dense-sparse
(calibrated on 128 sentences), then distils the converted model towards the
original one: the loss is 1 − cosine between their mean-pooled embeddings of
the same calibration sentences (never the held-out ones). In training mode
every DenseSparseLinear trains D and a dense shadow of S whose top-s entries
per column are used, so the sparsity pattern can move; ``eval()`` packs S
again. Prints held-out fidelity before and after, the steps and the CPU time.
"""
from __future__ import annotations

import argparse
import itertools
import time

import torch
import torch.nn.functional as F

import reparam
from reparam.minilm import Harness, embed, mean_pool
from reparam.progress import progress_bar


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--size-ratio", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=1e-4)
    args = parser.parse_args()
    torch.manual_seed(0)

    harness = Harness.build()
    model = harness.fresh_model()
    reparam.convert(model, {harness.layers: {"method": "dense_sparse", "size_ratio": args.size_ratio}},
                    calib=harness.calib)
    before = harness.fidelity(model)
    print(f"fidelity after conversion: {before:.4f}")

    targets = [embed(harness.fresh_model(), [batch]) for batch in harness.calib]  # the original's embeddings
    # train() on the converted layers fills their STF shadows (build the
    # optimizer after it); the rest of the model stays in eval, dropout off.
    layers = [m.train() for m in model.modules() if isinstance(m, reparam.DenseSparseLinear)]
    model.requires_grad_(False)  # only the factors train; everything else stays as it was
    trainable = [p for layer in layers for p in (layer.d, layer.shadow)]
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(trainable, lr=args.lr)

    start = time.process_time()
    batches = itertools.cycle(zip(harness.calib, targets))
    for step in progress_bar(range(args.steps), desc="STF distillation", total=args.steps):
        batch, target = next(batches)
        loss = (1 - F.cosine_similarity(mean_pool(model, batch), target, dim=-1)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    cpu_seconds = time.process_time() - start
    model.eval()  # packs every S back into values and indices

    after = harness.fidelity(model)
    print(f"fidelity after {args.steps} STF steps: {after:.4f} (was {before:.4f}); "
          f"{cpu_seconds:.0f} s of CPU time for training")


if __name__ == "__main__":
    main()
