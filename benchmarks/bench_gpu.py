"""GPU: every Triton kernel against its torch reference on CUDA, then the
bit-plane layers timed against fp16 cuBLAS.

    python benchmarks/bench_gpu.py [--quick]

1. Correctness: ``bitplane_gemv`` (autotuned), ``bitplane_triton``,
   ``sparse_codes_triton`` and the compander's forward and backward against
   their torch references, at odd shapes in fp32, fp16 and bf16.
2. Speed: y = x·Wᵀ at 4096² and SmolLM2's shapes (576x576, 576x192,
   576x1536, 1536x576), 1, 16 and 128 tokens, shift_add-style planes at 2, 3
   and 4 bits (group 128), fp16 activations, against ``F.linear`` on an fp16
   weight (cuBLAS). Each arm is captured in a CUDA graph of ``CALLS`` calls
   and replayed; the time per call is the median over ``REPEATS`` replays.
   Autotuning runs once per shape before capture.

Runs in well under 5 minutes on one H100. Where there is no CUDA device (or no
triton) it says so and exits 0: CI proves the kernels under TRITON_INTERPRET=1
in tests/kernels instead. Results: benchmarks/results/gpu.{json,md}.
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from common import write_results

SHAPES = ((4096, 4096), (576, 576), (576, 192), (576, 1536), (1536, 576))  # (in, out)
TOKENS = (1, 16, 128)
BITS = (2, 3, 4)
CALLS, REPEATS = 50, 20
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
TF32 = 2e-3  # tl.dot on float32 inputs runs in tf32 on tensor cores (the tiled kernel)
# (tokens, in, out, bits, group) for the bit-plane checks; (tokens, in, atoms, nnz) for the sparse codes
BITPLANE_CHECKS = ((1, 200, 97, 3, 64), (16, 4096, 4096, 2, 128), (5, 576, 1536, 4, 128), (77, 1536, 576, 3, 128))
SPARSE_CHECKS = ((1, 70, 48, 20), (33, 576, 300, 16))


def random_bitplane(in_features: int, out_features: int, bits: int, group_size: int = 128,
                    device: str = "cuda"):
    from reparam.kernels.bitplane import planes_from_codes

    groups = -(-in_features // group_size)
    codes = torch.randint(0, 2 ** bits, (out_features, groups * group_size))
    codes[:, in_features:] = 0
    coef = torch.rand(bits, out_features, groups) * 0.02
    offset = -coef.sum(0) / 2
    return [t.to(device) for t in (planes_from_codes(codes, bits), coef, offset)]


def relative_error(result: torch.Tensor, expected: torch.Tensor) -> float:
    return float((result.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-12))


def correctness_rows(device: str = "cuda") -> list[dict]:
    from reparam.kernels.bitplane import bitplane_gemv, bitplane_reference, bitplane_triton
    from reparam.kernels.compander import compander_backward_triton, compander_forward_triton, compander_reference
    from reparam.kernels.dense_sparse import sparse_codes_triton, sparse_to_dense

    rows = []

    def record(kernel, shape, dtype, result, expected):
        error = relative_error(result, expected)
        tolerance = max(TOLERANCE[dtype], TF32) if kernel in ("bitplane_triton", "sparse_codes_triton") \
            else TOLERANCE[dtype]
        rows.append({"kernel": kernel, "shape": shape, "dtype": str(dtype).removeprefix("torch."),
                     "max error / max |ref|": error, "tolerance": tolerance,
                     "ok": "yes" if error <= tolerance else "NO"})
        print(rows[-1], flush=True)

    for dtype in TOLERANCE:
        for tokens, in_features, out_features, bits, group in BITPLANE_CHECKS:
            planes, coef, offset = random_bitplane(in_features, out_features, bits, group, device)
            bias = torch.randn(out_features, device=device, dtype=dtype)
            x = torch.randn(tokens, in_features, device=device, dtype=dtype)
            expected = bitplane_reference(x.double(), planes, coef.double(), offset.double(), group, bias.double())
            shape = f"{tokens}x{in_features}->{out_features}, {bits}-bit"
            if tokens <= 16:
                record("bitplane_gemv", shape, dtype, bitplane_gemv(x, planes, coef, offset, group, bias), expected)
            record("bitplane_triton", shape, dtype, bitplane_triton(x, planes, coef, offset, group, bias), expected)
        for tokens, in_features, atoms, nnz in SPARSE_CHECKS:
            values = torch.randn(nnz, in_features, device=device, dtype=dtype)
            indices = torch.stack([torch.randperm(atoms)[:nnz] for _ in range(in_features)], 1)
            indices = indices.to(torch.int16).to(device)
            x = torch.randn(tokens, in_features, device=device, dtype=dtype)
            expected = x.double() @ sparse_to_dense(values.double(), indices, atoms).T
            record("sparse_codes_triton", f"{tokens}x{in_features}->{atoms}, nnz {nnz}", dtype,
                   sparse_codes_triton(x, values, indices, atoms), expected)
        v = torch.randn(1000, 37, device=device, dtype=dtype)
        a, b = torch.tensor(0.7, device=device, dtype=dtype), torch.tensor(1.3, device=device, dtype=dtype)
        record("compander forward", "1000x37", dtype, compander_forward_triton(v, a, b),
               compander_reference(v.double(), a.double(), b.double()))
        grad = torch.randn_like(v)
        leaves = [t.double().requires_grad_() for t in (v, a, b)]
        expected = torch.autograd.grad(compander_reference(*leaves), leaves, grad.double())
        for name, result, reference in zip(("dv", "da", "db"), compander_backward_triton(grad, v, a, b), expected):
            record(f"compander backward {name}", "1000x37", dtype, result, reference)
    return rows


def graph_time(fn) -> float:
    """Median seconds per call of ``fn`` replayed from a CUDA graph of CALLS calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up (and autotuning) outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn()
    times = []
    for _ in range(REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / CALLS)
    return statistics.median(times)


def speed_rows(quick: bool) -> list[dict]:
    from reparam.kernels.bitplane import bitplane_linear

    rows = []
    for in_features, out_features in SHAPES[:2] if quick else SHAPES:
        weight = torch.randn(out_features, in_features, device="cuda", dtype=torch.float16) * 0.02
        for tokens in TOKENS:
            x = torch.randn(tokens, in_features, device="cuda", dtype=torch.float16)
            dense = graph_time(lambda: F.linear(x, weight))
            for bits in BITS:
                planes, coef, offset = random_bitplane(in_features, out_features, bits)
                ours = graph_time(lambda: bitplane_linear(x, planes, coef, offset, 128))
                rows.append({"shape (in, out)": f"{in_features}x{out_features}", "tokens": tokens, "bits": bits,
                             "kernel": "gemv" if tokens <= 16 else "tiled", "fp16 cuBLAS us": dense * 1e6,
                             "bit-plane us": ours * 1e6, "speedup": dense / ours})
                print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two shapes only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device on this machine, nothing to measure; the Triton kernels are checked on "
              "CPU under TRITON_INTERPRET=1 by tests/kernels.")
        return
    try:
        import triton  # noqa: F401
    except ImportError:
        print("bench_gpu: triton is not installed (pip install 'reparam[kernels]'); nothing to measure.")
        return
    torch.manual_seed(0)
    checks = correctness_rows()
    speed = speed_rows(args.quick)
    from common import markdown_table

    device = torch.cuda.get_device_name()
    failed = [row for row in checks if row["ok"] != "yes"]
    notes = (f"Device: {device}. Speedup = fp16 cuBLAS time / bit-plane time (CUDA graphs, medians).\n\n"
             f"## Correctness ({len(checks) - len(failed)}/{len(checks)} within tolerance)\n\n"
             + markdown_table(checks))
    print(write_results("gpu", speed, "python benchmarks/bench_gpu.py" + (" --quick" if args.quick else ""), notes))
    if failed:
        raise SystemExit(f"bench_gpu: {len(failed)} kernel checks out of tolerance: {failed}")


if __name__ == "__main__":
    main()
