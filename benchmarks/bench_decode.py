"""End-to-end CPU speed, dense against shift_add 3-bit (the group sizes convert gives: 64 on 576 inputs).

    python benchmarks/bench_decode.py [--threads 1 2] [--new-tokens 32]

- MiniLM (all-MiniLM-L6-v2): one sentence's forward latency, with all 36
  encoder Linear layers compressed.
- SmolLM2-135M: greedy decode tokens per second (prompt, then ``--new-tokens``
  tokens one at a time with the KV cache), with every Linear of the 30 decoder
  layers compressed (the tied embedding / lm_head stays dense, as recipes
  leave it), and once more with the lm_head (576x49152, a fifth of the
  weights, the largest single matmul per token) compressed too.

Speed only: the compressed layers hold random planes and scales (a fit would
take minutes and does not change the time), so the decoded text is noise;
quality is measured in benchmarks/bench_shift_add.py and the LLM examples.
Arms run interleaved, medians; results in benchmarks/results/decode.{json,md}.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from reparam.bench import compare_latency
from reparam.kernels.extension import compiled_ops

from bench_kernels import random_quantized
from common import write_results


@torch.no_grad()
def compress_randomly(model: nn.Module, prefix: str, bits: int = 3) -> int:
    """Swap every nn.Linear under ``prefix`` for a random shift_add layer; returns how many."""
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and name.startswith(prefix)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        dense = model.get_submodule(name)
        layer = random_quantized("shift_add", bits, dense.in_features, dense.out_features)
        if dense.bias is None:
            layer.bias = None
        else:
            layer.bias.copy_(dense.bias)
        setattr(model.get_submodule(parent_name), child, layer)
    return len(names)


def minilm_row(rounds: int) -> dict:
    from reparam import minilm

    dense, compressed = minilm.load_model(), minilm.load_model()
    count = compress_randomly(compressed, "encoder.")
    batch = minilm.batches(["A compressed layer should be faster than the dense one it replaces."])[0]
    with torch.inference_mode():  # inference as served: with autograd on, each compressed layer records a node
        times = compare_latency({"dense": lambda: dense(**batch), "compressed": lambda: compressed(**batch)},
                                rounds=rounds)
    return {"model": "MiniLM-L6", "what": f"1 sentence forward ({batch['input_ids'].shape[1]} tokens), "
                                          f"{count} layers compressed",
            "dense": f"{times['dense'] * 1e3:.2f} ms", "shift_add 3-bit": f"{times['compressed'] * 1e3:.2f} ms",
            "speedup": times["dense"] / times["compressed"], "target": "> 1"}


@torch.no_grad()
def tokens_per_second(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    output = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    elapsed = time.perf_counter() - start
    assert output.shape[1] == prompt.shape[1] + new_tokens
    return new_tokens / elapsed


def smollm2_row(rounds: int, new_tokens: int, prefixes: tuple[str, ...]) -> dict:
    from reparam import llm

    dense, compressed = llm.load_model(), llm.load_model()
    count = sum(compress_randomly(compressed, prefix) for prefix in prefixes)
    prompt = llm.load_tokenizer()("def fibonacci(n):", return_tensors="pt")["input_ids"]
    for model in (dense, compressed):
        tokens_per_second(model, prompt, 4)  # warm-up
    speeds = {"dense": [], "compressed": []}
    for _ in range(rounds):
        for name, model in (("dense", dense), ("compressed", compressed)):
            speeds[name].append(tokens_per_second(model, prompt, new_tokens))
    dense_speed, compressed_speed = (statistics.median(speeds[k]) for k in ("dense", "compressed"))
    what = f"greedy decode, {new_tokens} new tokens, {count} layers compressed" + (
        " (lm_head too)" if "lm_head" in prefixes else "")
    return {"model": "SmolLM2-135M", "what": what,
            "dense": f"{dense_speed:.1f} tok/s", "shift_add 3-bit": f"{compressed_speed:.1f} tok/s",
            "speedup": compressed_speed / dense_speed, "target": ">= 2"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if compiled_ops() is None:
        raise SystemExit("the compiled kernels are unavailable: this benchmark measures them")
    torch.manual_seed(0)
    command = (f"python benchmarks/bench_decode.py --threads {' '.join(map(str, args.threads))} "
               f"--new-tokens {args.new_tokens} --rounds {args.rounds}")
    notes = ("Random shift_add contents: speed only. SmolLM2 was stored as Q4_1 in its GGUF and is dequantized to "
             "fp32 on load; the dense arm runs those fp32 weights.")
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for row in (minilm_row(3 * args.rounds), smollm2_row(args.rounds, args.new_tokens, ("model.layers.",)),
                    smollm2_row(args.rounds, args.new_tokens, ("model.layers.", "lm_head"))):
            rows.append({"threads": threads, **row})
            print(rows[-1], flush=True)
        # written after each thread count, so a run stopped during a slow 2-thread pass keeps what it measured
        table = write_results("decode", rows, command, notes)
    print(table)


if __name__ == "__main__":
    main()
