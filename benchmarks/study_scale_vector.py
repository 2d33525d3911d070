"""Training study: scale vectors in a small pre-norm transformer on real text
(the characters of CPython's documentation, ``pydoc_data.topics``).

    python benchmarks/study_scale_vector.py [--seeds 2] [--steps 400]

Two arms, same initialization, batches and optimizer (Adam, lr 3e-3):
- baseline: plain LayerNorm γ and Linear layers;
- scale vectors: every LayerNorm's γ in magnitude-direction form, and every
  Linear of the blocks wrapped as diag(u)·W·diag(v) (so Q, K and V get
  branch-specific input scales after their shared norm).
Prints the final training and validation losses (nats per character) and
saves the loss curves to benchmarks/results/study_scale_vector.png.
"""
from __future__ import annotations

import argparse
import statistics
import time

import pydoc_data.topics
import torch
import torch.nn.functional as F
from torch import nn

import reparam

from common import RESULTS, interleaved_runs, write_results

CONTEXT, WIDTH, HEADS, LAYERS, BATCH = 64, 64, 4, 2, 32
RECIPE = {"LayerNorm": {"method": "scale_vector"}, "re:blocks\\..*": {"method": "scale_vector"}}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.query, self.key, self.value = (nn.Linear(WIDTH, WIDTH) for _ in range(3))
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.up, self.down = nn.Linear(WIDTH, 4 * WIDTH), nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x):  # (B, T, C)
        h = self.norm1(x)
        heads = [f(h).unflatten(-1, (HEADS, -1)).transpose(1, 2) for f in (self.query, self.key, self.value)]
        attended = F.scaled_dot_product_attention(*heads, is_causal=True)  # (B, H, T, C/H)
        x = x + self.proj(attended.transpose(1, 2).flatten(2))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class CharTransformer(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, WIDTH)
        self.position = nn.Parameter(torch.randn(CONTEXT, WIDTH) * 0.02)
        self.blocks = nn.Sequential(*(Block() for _ in range(LAYERS)))
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, vocab)

    def forward(self, tokens):  # (B, T)
        return self.head(self.norm(self.blocks(self.embed(tokens) + self.position)))


def corpus() -> tuple[torch.Tensor, torch.Tensor, int]:
    text = "\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    split = int(0.9 * len(ids))
    return ids[:split], ids[split:], len(chars)


def batch(ids: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.randint(len(ids) - CONTEXT - 1, (BATCH,), generator=generator)
    window = torch.stack([ids[s:s + CONTEXT + 1] for s in start.tolist()])
    return window[:, :-1], window[:, 1:]


def run(scale_vectors: bool, seed: int, steps: int, data) -> tuple[list[float], float, float]:
    train_ids, val_ids, vocab = data
    torch.manual_seed(seed)
    model = CharTransformer(vocab)
    if scale_vectors:
        reparam.convert(model, RECIPE, progress=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        x, y = batch(train_ids, generator)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    with torch.no_grad():
        val_generator = torch.Generator().manual_seed(1234)
        val = statistics.mean(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
                              for x, y in (batch(val_ids, val_generator) for _ in range(20)))
    return losses, val, seconds


def smooth(values: list[float], width: int = 20) -> list[float]:
    return [statistics.mean(values[max(0, i - width + 1):i + 1]) for i in range(len(values))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = corpus()
    arms = {"baseline": False, "scale vectors": True}
    results = interleaved_runs(arms, args.seeds, lambda flag, seed: run(flag, seed, args.steps, data))
    base_time = statistics.mean(r[2] for r in results["baseline"])
    rows = []
    for name, runs in results.items():
        final_train = [statistics.mean(r[0][-50:]) for r in runs]
        rows.append({"arm": name,
                     "train loss, last 50 steps": f"{statistics.mean(final_train):.3f} ± {statistics.pstdev(final_train):.3f}",
                     "validation loss": f"{statistics.mean(r[1] for r in runs):.3f} ± "
                                        f"{statistics.pstdev([r[1] for r in runs]):.3f}",
                     "train time vs baseline": round(statistics.mean(r[2] for r in runs) / base_time, 3)})
    plot(results)
    command = f"python benchmarks/study_scale_vector.py --seeds {args.seeds} --steps {args.steps}"
    print(write_results("study_scale_vector", rows, command,
                        "Loss in nats per character; curves in study_scale_vector.png."))


def plot(results) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (name, runs), color in zip(results.items(), ("tab:blue", "tab:orange")):
        for i, (losses, _, _) in enumerate(runs):
            ax.plot(smooth(losses), color=color, alpha=0.8, label=name if i == 0 else None)
    ax.set(xlabel="step", ylabel="training loss (nats/char, 20-step mean)", ylim=(None, 3.5),
           title="Pre-norm char transformer on pydoc_data.topics")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "study_scale_vector.png", dpi=120)


if __name__ == "__main__":
    main()
