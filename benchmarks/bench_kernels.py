"""CPU layer speed: every compressed layer against the fp32 nn.Linear it replaces.

    python benchmarks/bench_kernels.py [--threads 1 2] [--quick]

Speedup = dense time / layer time, both timed side by side in one process,
interleaved round after round, medians (``reparam.bench.compare_latency``),
at each thread count, under ``torch.inference_mode()`` (inference as deployed;
with autograd on, a compressed layer whose bias requires grad goes through the
registered op's autograd wrapper, about 6 µs more a call). Layers get the
group size ``convert`` would give them. Layers hold random valid contents (random planes and
scales, random sparse codes): speed does not depend on the values, and this
keeps the script free of slow fits. Cases and the issue's targets:

- 4096² at 1 token: shift_add 3-bit (≥ 3×), 2-bit (≥ 4×), affine 4-bit (≥ 2.5×);
- 4096² at 128 tokens: shift_add 3-bit (≥ 1.0×);
- MiniLM (384x384, 384x1536, 1536x384) and SmolLM2 (576x576, 576x192,
  576x1536, 1536x576) shapes at 1 token, shift_add 3-bit (≥ 1.5×);
- dense_sparse and low_rank at half the dense bytes (≥ 1.0×), 1 and 8 tokens;
- affine 4-bit 4096² at 1 token on torch's ``_weight_int4pack_mm_for_cpu``
  (random int4 weights), beside the bit-plane kernel;
- shift_add 3-bit 4096² at 128 tokens with bf16 products (torch's "medium"
  float32 matmul precision, and bf16 inputs) against dense in the same setting;
- the LUT / decode-and-GEMM crossover: both compiled paths at 1–128 tokens, and the
  crossover ``bitplane_linear`` measured on this machine for 2, 3 and 4 planes.

Results: benchmarks/results/kernels.{json,md}; with ``--isa avx2`` (or ``scalar``) the
kernels are capped to that instruction set, as on a CPU without the wider ones, and the
results go to kernels_avx2.{json,md}.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from reparam.bench import compare_latency
from reparam.kernels.extension import compiled_ops
from reparam.methods.affine import AffineConfig, AffineLinear
from reparam.methods.dense_sparse import DenseSparseConfig, DenseSparseLinear
from reparam.methods.low_rank import LowRankConfig, LowRankLinear
from reparam.methods.shift_add import ShiftAddConfig, ShiftAddLinear

from common import write_results

MINILM_SHAPES = ((384, 384), (384, 1536), (1536, 384))  # (in, out)
SMOLLM2_SHAPES = ((576, 576), (576, 192), (576, 1536), (1536, 576))


@torch.no_grad()
def random_quantized(method: str, bits: int, in_features: int, out_features: int, group_size: int | None = None):
    """A shift_add or affine layer with random planes and valid random scales; the default group size is the one
    ``convert`` gives that width (64 for SmolLM2's 576 inputs, 128 for the others here)."""
    if method == "shift_add":
        layer = ShiftAddLinear(in_features, out_features, True, ShiftAddConfig(bits=bits, group_size=group_size))
        layer.params.copy_(torch.rand(layer.params.shape) * 0.02)
    else:
        layer = AffineLinear(in_features, out_features, True, AffineConfig(bits=bits, group_size=group_size))
        layer.params[..., 0] = torch.rand(layer.params.shape[:-1]) * 0.01
        layer.params[..., 1] = torch.randint(0, 2 ** bits, layer.params.shape[:-1]).half()
    layer.planes.copy_(torch.randint(0, 256, layer.planes.shape, dtype=torch.uint8))
    layer.bias.normal_()
    return layer


@torch.no_grad()
def random_factorized(method: str, in_features: int, out_features: int, size_ratio: float = 0.5):
    if method == "low_rank":
        layer = LowRankLinear(in_features, out_features, True, LowRankConfig(size_ratio=size_ratio))
        layer.u.normal_(), layer.v.normal_()
    else:
        layer = DenseSparseLinear(in_features, out_features, True, DenseSparseConfig(size_ratio=size_ratio))
        layer.d.normal_(), layer.values.normal_()
        layer.indices.copy_(torch.randint(0, layer.atoms, layer.indices.shape).to(layer.indices.dtype))
    layer.bias.normal_()
    return layer


@torch.inference_mode()  # inference as deployed (generate() runs without autograd too), for both sides
def speedup(layer: nn.Module, tokens: int, rounds: int) -> dict:
    dense = nn.Linear(layer.in_features, layer.out_features)
    x = torch.randn(tokens, layer.in_features)
    times = compare_latency({"dense": lambda: dense(x), "layer": lambda: layer(x)}, rounds=rounds)
    return {"dense ms": times["dense"] * 1e3, "layer ms": times["layer"] * 1e3,
            "speedup": times["dense"] / times["layer"]}


def int4pack_speedup(tokens: int, rounds: int, size: int = 4096, group_size: int = 128) -> dict:
    """torch's int4 CPU kernel (as torchao uses it) on random 4-bit weights, against dense and the bit-plane LUT."""
    codes = torch.randint(0, 16, (size, size), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    scales_and_zeros = torch.rand(size // group_size, size, 2)
    ours = random_quantized("affine", 4, size, size, group_size)
    dense = nn.Linear(size, size)
    x = torch.randn(tokens, size)
    with torch.inference_mode():  # the layers are built outside it: inference tensors would defeat their caches
        times = compare_latency({
            "dense": lambda: dense(x),
            "int4pack": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros),
            "bitplane": lambda: ours(x)}, rounds=rounds)
    return {"dense ms": times["dense"] * 1e3, "int4pack ms": times["int4pack"] * 1e3,
            "bitplane ms": times["bitplane"] * 1e3, "int4pack speedup": times["dense"] / times["int4pack"],
            "bitplane speedup": times["dense"] / times["bitplane"]}


def precise(fn, precision: str):
    """``fn`` run under torch's float32 matmul ``precision`` ("highest": float32; "medium": bf16 products)."""
    def run():
        torch.set_float32_matmul_precision(precision)
        return fn()
    return run


def bf16_products(tokens: int, rounds: int, size: int = 4096) -> dict:
    """Decode-and-GEMM with bf16 products against dense at both float32 matmul precisions, and with bf16 inputs
    against a bf16 nn.Linear, all interleaved in one comparison."""
    ours = random_quantized("shift_add", 3, size, size)
    dense = nn.Linear(size, size)
    dense_bf16 = nn.Linear(size, size).bfloat16()
    x = torch.randn(tokens, size)
    x_bf16 = x.bfloat16()
    previous = torch.get_float32_matmul_precision()
    with torch.inference_mode():
        times = compare_latency({
            "dense": precise(lambda: dense(x), "highest"), "ours": precise(lambda: ours(x), "highest"),
            "dense medium": precise(lambda: dense(x), "medium"), "ours medium": precise(lambda: ours(x), "medium"),
            "dense bf16": lambda: dense_bf16(x_bf16), "ours bf16": lambda: ours(x_bf16)}, rounds=rounds)
    torch.set_float32_matmul_precision(previous)
    return {"tokens": tokens, **{f"{name} ms": seconds * 1e3 for name, seconds in times.items()},
            "medium vs dense": times["dense"] / times["ours medium"],
            "medium vs dense medium": times["dense medium"] / times["ours medium"],
            "bf16 vs dense bf16": times["dense bf16"] / times["ours bf16"]}


def crossover(in_features: int, out_features: int, tokens: tuple[int, ...], rounds: int) -> list[dict]:
    """The compiled LUT against decode-and-GEMM at growing token counts."""
    ops = compiled_ops()
    layer = random_quantized("shift_add", 3, in_features, out_features)
    coef, offset = layer._cached_linear_form()
    args = (layer.planes, coef, offset, layer.config.group_size, layer.bias)
    rows = []
    for count in tokens:
        x = torch.randn(count, in_features)
        with torch.inference_mode():
            times = compare_latency({"lut": lambda: ops.bitplane_lut(x, *args),
                                     "decode_mm": lambda: ops.bitplane_decode_mm(x, *args)}, rounds=rounds)
        rows.append({"shape (in, out)": f"{in_features}x{out_features}", "tokens": count,
                     "lut ms": times["lut"] * 1e3, "decode_mm ms": times["decode_mm"] * 1e3})
        print(rows[-1], flush=True)
    return rows


CROSSOVER_TOKENS = (1, 4, 8, 16, 32, 64, 128)
ISAS = {"scalar": 0, "avx2": 1, "avx512": 2}  # the levels of reparam_cpu::set_isa_limit


def describe_limit(tokens: int) -> str:
    return "no limit" if tokens == 2 ** 63 - 1 else str(tokens)


def cases(quick: bool) -> list[tuple[str, str, nn.Module, int, float]]:
    """(case, shape, layer, tokens, target speedup)."""
    big = [("shift_add 3-bit", random_quantized("shift_add", 3, 4096, 4096), 1, 3.0),
           ("shift_add 2-bit", random_quantized("shift_add", 2, 4096, 4096), 1, 4.0),
           ("affine 4-bit", random_quantized("affine", 4, 4096, 4096), 1, 2.5)]
    rows = [(name, "4096x4096", layer, tokens, target) for name, layer, tokens, target in big]
    rows.append(("shift_add 3-bit", "4096x4096", big[0][1], 128, 1.0))
    shapes = MINILM_SHAPES + SMOLLM2_SHAPES
    for in_features, out_features in shapes[:2] if quick else shapes:
        shape = f"{in_features}x{out_features}"
        rows.append(("shift_add 3-bit", shape, random_quantized("shift_add", 3, in_features, out_features), 1, 1.5))
        for method in ("dense_sparse", "low_rank"):
            layer = random_factorized(method, in_features, out_features)
            rows += [(f"{method} 0.5 size", shape, layer, tokens, 1.0) for tokens in (1, 8)]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and rounds (a smoke run)")
    parser.add_argument("--isa", choices=sorted(ISAS), help="cap the kernels' instruction set (as a CPU without the "
                        "wider ones would run); results go to kernels_<isa>.{json,md}")
    args = parser.parse_args()
    if compiled_ops() is None:
        raise SystemExit("the compiled kernels are unavailable: this benchmark measures them")
    if args.isa:
        if ISAS[args.isa] > compiled_ops().cpu_isa():
            raise SystemExit(f"this CPU has no {args.isa}")
        compiled_ops().set_isa_limit(ISAS[args.isa])
    rounds = 5 if args.quick else 15
    torch.manual_seed(0)
    layers = cases(args.quick)
    rows, int4_rows, bf16_rows, crossover_rows, measured_rows = [], [], [], [], []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, shape, layer, tokens, target in layers:
            row = {"threads": threads, "layer": name, "shape (in, out)": shape, "tokens": tokens,
                   **speedup(layer, tokens, rounds), "target": target}
            row["met"] = "yes" if row["speedup"] >= target else "no"
            rows.append(row)
            print(row, flush=True)
        int4_rows.append({"threads": threads, **int4pack_speedup(1, rounds)})
        print(int4_rows[-1], flush=True)
        bf16_rows.append({"threads": threads, **bf16_products(128, rounds)})
        print(bf16_rows[-1], flush=True)
        crossover_rows += [{"threads": threads, **row}
                           for row in crossover(4096, 4096, CROSSOVER_TOKENS, rounds)
                           + crossover(576, 1536, CROSSOVER_TOKENS, rounds)]
        limits = {f"{bits} planes": describe_limit(compiled_ops().lut_crossover(bits)) for bits in (2, 3, 4)}
        measured_rows.append({"threads": threads, **limits})
        print(measured_rows[-1], flush=True)
    notes = ("Random layer contents (speed only). Speedup = dense fp32 nn.Linear time / layer time, "
             "interleaved, medians.\n\n## torch int4 (_weight_int4pack_mm_for_cpu) vs bit-plane, affine 4-bit "
             "4096², 1 token\n\n" + markdown(int4_rows)
             + "\n\n## bf16 products, shift_add 3-bit 4096², 128 tokens\n\n"
             "\"medium\": torch.set_float32_matmul_precision(\"medium\") (bf16 products for float32 matmuls, "
             "dense ones included); \"bf16\": bf16 inputs, against a bf16 nn.Linear.\n\n" + markdown(bf16_rows)
             + "\n\n## Compiled LUT vs decode-and-GEMM (shift_add "
             "3-bit)\n\n" + markdown(crossover_rows)
             + "\n\n## The crossover bitplane_linear measured on this machine (most tokens the LUT takes)\n\n"
             + markdown(measured_rows))
    command = "python benchmarks/bench_kernels.py " + " ".join(
        ["--threads", *map(str, args.threads)] + (["--quick"] if args.quick else [])
        + (["--isa", args.isa] if args.isa else []))
    print(write_results(f"kernels_{args.isa}" if args.isa else "kernels", rows, command, notes))


def markdown(rows: list[dict]) -> str:
    from common import markdown_table

    return markdown_table(rows)


if __name__ == "__main__":
    main()
