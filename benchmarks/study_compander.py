"""Training study: the weight compander on a real dataset (scikit-learn's digits).

    python benchmarks/study_compander.py [--seeds 5] [--epochs 30]

A small CNN (two 3×3 convolutions and a linear classifier, every weight
companded) trained with SGD + momentum and weight decay 5e-4, three ways:

- plain: ordinary weight decay;
- fixed: compander with the paper's fixed (a, b) = (1.0, 0.6) (its ResNet50 /
  CIFAR-10 grid-search optimum), decay on Ψ(v);
- learnable: compander with one learnable (a, b) per layer, the paper's
  init (0.5, 1.0), decay on v only, a and b at lr/10.

Same data split for all (70/30, stratified, fixed); each seed fixes the
initialization and the batch order, identical across the three arms.
Prints mean ± std test accuracy, training time relative to plain, and the
learned a, b per layer.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import reparam
from reparam.methods.compander import companders
from reparam.optim import param_groups, weight_decay_penalty

from common import interleaved_runs, write_results

ARMS = {
    "plain": None,
    "fixed (a, b) = (1.0, 0.6)": {"method": "compander", "a": 1.0, "b": 0.6},
    "learnable (init 0.5, 1.0)": {"method": "compander", "a": 0.5, "b": 1.0, "learnable": True},
}
WEIGHT_DECAY = 5e-4


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):  # (B, 1, 8, 8)
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 32, 4, 4)
        return self.fc(x.flatten(1))


def data():
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    train_x, test_x, train_y, test_y = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    return train_x, train_y, test_x, test_y


def train(arm: dict | None, seed: int, epochs: int, split) -> tuple[float, float, dict]:
    train_x, train_y, test_x, test_y = split
    torch.manual_seed(seed)
    model = DigitsCNN()
    if arm is not None:
        reparam.convert(model, {"Conv2d": arm, "Linear": arm}, progress=False)
    # a, b at a tenth of the weights' learning rate: at the same rate they diverge (a → 0.02, b → 80 in 3 epochs).
    optimizer = torch.optim.SGD(param_groups(model, WEIGHT_DECAY, ab_lr=0.005), lr=0.05, momentum=0.9)
    order = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        for idx in torch.randperm(len(train_x), generator=order).split(64):
            loss = F.cross_entropy(model(train_x[idx]), train_y[idx])
            loss = loss + weight_decay_penalty(model, WEIGHT_DECAY)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        accuracy = float((model(test_x).argmax(1) == test_y).float().mean())
    learned = {name: (float(c.a.detach()), float(c.b.detach())) for name, (_, c) in zip(("conv1", "conv2", "fc"), companders(model))}
    return accuracy, seconds, learned


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)  # small batches: one thread is faster and steadier
    split = data()
    results = interleaved_runs(ARMS, args.seeds, lambda arm, seed: train(arm, seed, args.epochs, split))
    plain_time = statistics.mean(r[1] for r in results["plain"])
    rows = []
    for name, runs in results.items():
        accuracies = [100 * r[0] for r in runs]
        row = {"arm": name, "test accuracy % (mean ± std)":
               f"{statistics.mean(accuracies):.2f} ± {statistics.stdev(accuracies):.2f}",
               "train time vs plain": round(statistics.mean(r[1] for r in runs) / plain_time, 3)}
        if runs[0][2] and "learnable" in name:
            for layer in runs[0][2]:
                a = statistics.mean(r[2][layer][0] for r in runs)
                b = statistics.mean(r[2][layer][1] for r in runs)
                row[f"learned a, b: {layer}"] = f"{a:.3f}, {b:.3f}"
        rows.append(row)
    for row in rows:
        row.update({k: row.get(k, "-") for r in rows for k in r})
    rows = [{k: row[k] for k in rows[-1]} for row in rows]
    command = f"python benchmarks/study_compander.py --seeds {args.seeds} --epochs {args.epochs}"
    print(write_results("study_compander", rows, command,
                        f"{len(split[0])} training and {len(split[2])} test digits; {args.seeds} seeds."))


if __name__ == "__main__":
    main()
