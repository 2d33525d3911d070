"""QLoRA-style: compress MiniLM to 3-bit shift-add, then fine-tune LoRA adapters
on the compressed model (peft), distilling towards the dense model's sentence
embeddings; prints held-out fidelity before and after.

    python examples/finetune_lora.py --steps 50

The compressed weights stay frozen and compressed; only the adapters train,
through the compressed forward (the compiled kernels have a backward).
"""
from __future__ import annotations

import argparse

import torch
from peft import LoraConfig, get_peft_model

import reparam
from reparam.integrations.peft import register
from reparam.minilm import Harness, mean_pool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    torch.manual_seed(0)

    harness = Harness.build()
    teacher, model = harness.fresh_model(), harness.fresh_model()
    reparam.convert(model, {harness.layers: {"method": "shift_add", "bits": 3}}, calib=harness.calib)
    print(f"compressed: fidelity {harness.fidelity(model):.4f}")

    config = register(LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                 target_modules=["query", "key", "value", "dense"]))
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    for step in range(args.steps):
        batch = harness.calib[step % len(harness.calib)]
        with torch.no_grad():
            target = mean_pool(teacher, batch)
        loss = 1 - torch.nn.functional.cosine_similarity(mean_pool(model, batch), target).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  distillation loss {float(loss):.5f}")
    model.eval()
    print(f"after {args.steps} LoRA steps: fidelity {harness.fidelity(model):.4f}")


if __name__ == "__main__":
    main()
