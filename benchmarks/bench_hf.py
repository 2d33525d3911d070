"""The Hugging Face round trip on the real models: checkpoint size, save and
load time, and whether the reloaded model's outputs equal the converted one's.

    python benchmarks/bench_hf.py

For each model and recipe: ``reparam.convert`` (data-free), the model's own
``save_pretrained``, then ``AutoModel*.from_pretrained`` of that folder alone
in the same process. Sizes are the bytes of the written safetensors file(s);
"layers" counts only the converted layers' tensors (as stored) against the
same layers in fp32. The dense row is the unconverted model saved the same way.
"""
from __future__ import annotations

import json
import struct
import tempfile
import time
from pathlib import Path

import torch

import reparam
from reparam import llm, minilm

from common import write_results

MINILM_RECIPES = {
    "affine 4-bit rtn": {"method": "affine", "bits": 4, "fit": "rtn"},
    "low_rank 0.5 svd": {"method": "low_rank", "size_ratio": 0.5, "factorizer": "svd"},
}
SMOLLM_RECIPES = {
    "affine 4-bit rtn g64": {"method": "affine", "bits": 4, "group_size": 64, "fit": "rtn"},
}


def stored_bytes(folder: Path) -> dict[str, int]:
    """Bytes of each tensor in the folder's safetensors files, from their headers."""
    sizes = {}
    for path in folder.glob("*.safetensors"):
        with open(path, "rb") as file:
            header = json.loads(file.read(struct.unpack("<Q", file.read(8))[0]))
        sizes.update({k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
                      if k != "__metadata__"})
    return sizes


def round_trip(name: str, recipe_name: str, load, auto_class, layers: str, config: dict | None,
               outputs) -> dict:
    model = load()
    converted_seconds = 0.0
    if config is not None:
        start = time.perf_counter()
        reparam.convert(model, {layers: config}, progress=False)
        converted_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        start = time.perf_counter()
        model.save_pretrained(folder)
        save_seconds = time.perf_counter() - start
        start = time.perf_counter()
        loaded = auto_class.from_pretrained(folder).eval()
        load_seconds = time.perf_counter() - start
        sizes = stored_bytes(folder)
        files = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    names = reparam.converted_modules(model)
    prefixes = tuple(f"{m}." for m in names)
    layer_bytes = sum(n for k, n in sizes.items() if k.startswith(prefixes))
    dense_layer_bytes = sum(4 * m.in_features * m.out_features + 4 * m.out_features * (m.bias is not None)
                            for n, m in model.named_modules() if n in names)
    exact = torch.equal(outputs(loaded), outputs(model))
    return {"model": name, "recipe": recipe_name, "checkpoint MB": files / 1e6,
            "layers vs fp32": layer_bytes / dense_layer_bytes if names else "-",
            "convert s": converted_seconds, "save_pretrained s": save_seconds,
            "from_pretrained s": load_seconds, "outputs equal": exact,
            "converted modules": len(names)}


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    sentences = minilm.batches(minilm.heldout_sentences(32))
    minilm_outputs = lambda model: minilm.embed(model, sentences)  # noqa: E731
    auto_model = minilm._imports()[0].AutoModel
    for recipe, config in {"dense": None, **MINILM_RECIPES}.items():
        rows.append(round_trip("MiniLM", recipe, minilm.load_model, auto_model, minilm.ENCODER_LINEARS,
                               config, minilm_outputs))
        print(rows[-1])
    window = llm.eval_windows(1)[0]

    @torch.no_grad()
    def smollm_outputs(model):
        return model(input_ids=window).logits

    def smollm():
        model = llm.load_model().eval()
        # Dequantized from the GGUF on load; drop the (unsaveable) GGUF marker so the dense row saves.
        model.hf_quantizer.remove_quantization_config(model)
        return model

    auto_lm = llm._transformers().AutoModelForCausalLM
    for recipe, config in {"dense": None, **SMOLLM_RECIPES}.items():
        rows.append(round_trip("SmolLM2-135M (Q4_1 GGUF, dequantized)", recipe, smollm, auto_lm,
                               llm.BLOCK_LINEARS, config, smollm_outputs))
        print(rows[-1])
    print(write_results("hf_round_trip", rows, "python benchmarks/bench_hf.py",
                        notes="1 torch thread; outputs: MiniLM mean-pooled embeddings of 32 held-out sentences, "
                              "SmolLM2 logits of one 256-token window; torch.equal"))


if __name__ == "__main__":
    main()
