"""The ``reparam`` command: convert a Hugging Face model, inspect a compressed
checkpoint without loading a model, and evaluate one against its base.

    reparam convert MODEL_DIR --recipe recipe.yaml --calib calib.txt --out OUT_DIR
    reparam inspect OUT_DIR            (or a file written by reparam.save)
    reparam eval OUT_DIR --base MODEL_DIR --text heldout.txt

Run ``reparam COMMAND --help`` for each command's options.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

logger = logging.getLogger("reparam")

EPILOG = """examples:
  reparam convert ./minilm --recipe recipe.yaml --calib sentences.txt --out ./minilm-3bit
  reparam inspect ./minilm-3bit
  reparam eval ./minilm-3bit --base ./minilm --text heldout.txt

A recipe file (YAML or JSON) maps module-name patterns to method configs, e.g.
  encoder.*: {method: shift_add, bits: 3}
See docs/api.md for patterns and docs/which_method.md for choosing a method."""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, ImportError) as err:  # the library's errors already say the fix
        print(f"reparam {args.command}: error: {err}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reparam", description=__doc__.split("\n\n")[0],
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each step does")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    convert = commands.add_parser(
        "convert", help="compress a Hugging Face model with a recipe and save it",
        description="Load MODEL_DIR with transformers, convert the layers the recipe selects (calibrating "
                    "data-aware methods on --calib), print the per-layer report and save the result.")
    convert.add_argument("model", metavar="MODEL_DIR", help="a transformers model directory (config.json + weights)")
    convert.add_argument("--recipe", required=True, help="YAML or JSON recipe: pattern -> method config")
    convert.add_argument("--calib", help="text file, one calibration sample per line (needed by data-aware methods)")
    convert.add_argument("--samples", type=int, default=128, help="calibration lines used (default 128)")
    convert.add_argument("--max-length", type=int, default=256, help="tokens per calibration sample (default 256)")
    convert.add_argument("--batch-size", type=int, default=8, help="calibration samples per batch (default 8)")
    convert.add_argument("--gguf-file", help="read the weights from this GGUF file inside MODEL_DIR")
    convert.add_argument("--out", required=True,
                         help="output directory (save_pretrained: loads back with from_pretrained), or a "
                              ".safetensors file (reparam.save: loads back with reparam.load)")
    convert.set_defaults(run=_convert)

    inspect = commands.add_parser(
        "inspect", help="list the converted layers of a checkpoint, without loading the model",
        description="Print each converted layer's method, config and stored bytes, read from the "
                    "safetensors header alone (no tensor data is read).")
    inspect.add_argument("path", metavar="PATH", help="a directory from `reparam convert` or a reparam.save file")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect.set_defaults(run=_inspect)

    evaluate = commands.add_parser(
        "eval", help="measure a converted model against its base on held-out text",
        description="Causal LMs: perplexity of both models on --text (windows of --max-length tokens). "
                    "Encoders: mean cosine similarity of mean-pooled embeddings (fidelity) on each line.")
    evaluate.add_argument("model", metavar="MODEL_DIR", help="the converted model directory")
    evaluate.add_argument("--base", required=True, help="the original model directory")
    evaluate.add_argument("--text", required=True, help="held-out text file (one sample per line for encoders)")
    evaluate.add_argument("--samples", type=int, default=64, help="lines (encoders) or windows (LMs) used")
    evaluate.add_argument("--max-length", type=int, default=256, help="tokens per sample or window")
    evaluate.add_argument("--gguf-file", help="read the base weights from this GGUF file inside --base")
    evaluate.set_defaults(run=_eval)
    return parser


def _convert(args: argparse.Namespace) -> int:
    import reparam

    model, tokenizer = _load(args.model, args.gguf_file)
    calib = None
    if args.calib:
        lines = _lines(args.calib)[:args.samples]
        calib = [dict(tokenizer(lines[i:i + args.batch_size], padding=True, truncation=True,
                                max_length=args.max_length, return_tensors="pt"))
                 for i in range(0, len(lines), args.batch_size)]
        logger.info("calibrating on %d samples from %s", len(lines), args.calib)
    report = reparam.convert(model, args.recipe, calib=calib)
    print(report)
    out = Path(args.out)
    if out.suffix == ".safetensors":
        reparam.save(model, out)
    else:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    print(f"saved to {out}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    rows = describe(args.path)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    width = max([len(r["module"]) for r in rows] + [len("module")])
    print(f"{'module':<{width}}  {'method':<13} {'bytes':>10}  config")
    for r in rows:
        config = ", ".join(f"{k}={v}" for k, v in r["config"].items() if k != "method")
        print(f"{r['module']:<{width}}  {r['method']:<13} {r['bytes']:>10,}  {config}")
    print(f"{len(rows)} converted modules, {sum(r['bytes'] for r in rows):,} bytes")
    return 0


# Bytes per element of each safetensors dtype name.
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def describe(path: str | Path) -> list[dict]:
    """Per converted module: name, method, config and stored bytes, from the
    checkpoint's headers and config alone (no tensor data is read).

    ``path``: a directory written by ``save_pretrained`` of a converted model,
    or a file written by ``reparam.save``.
    """
    from safetensors import safe_open

    from .file_checks import read_recipe

    path = Path(path)
    if path.is_dir():
        config = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
        if config.get("quant_method") != "reparam":
            raise ValueError(f"{path} holds no reparam model: its config.json has no quantization_config "
                             "with quant_method 'reparam'")
        modules, files = config["modules"], sorted(path.glob("*.safetensors"))
    else:
        with safe_open(str(path), framework="pt") as file:
            modules = {name: c.to_dict() for name, c in read_recipe(file.metadata() or {}, str(path)).items()}
        files = [path]
    sizes: dict[str, int] = {}
    for name in files:
        with safe_open(str(name), framework="pt") as file:
            for key in file.keys():
                tensor = file.get_slice(key)
                sizes[key] = math.prod(tensor.get_shape()) * ITEMSIZE[tensor.get_dtype()]
    return [{"module": name, "method": config["method"], "config": config,
             "bytes": sum(n for key, n in sizes.items() if key.startswith(name + "."))}
            for name, config in sorted(modules.items())]


def _eval(args: argparse.Namespace) -> int:
    import torch

    from .llm import perplexity
    from .minilm import mean_pool

    base, tokenizer = _load(args.base, args.gguf_file)
    model, _ = _load(args.model, None)
    if _is_causal_lm(base):
        ids = tokenizer("\n".join(_lines(args.text)), return_tensors="pt")["input_ids"][0]
        count = min(args.samples, ids.numel() // args.max_length)
        if count == 0:
            raise ValueError(f"{args.text} holds {ids.numel()} tokens, fewer than one window of "
                             f"{args.max_length}; pass a longer text or a smaller --max-length")
        windows = [ids[i * args.max_length:(i + 1) * args.max_length][None] for i in range(count)]
        for name, m in (("base", base), ("converted", model)):
            print(f"{name:<10} perplexity {perplexity(m, windows):.3f}  ({count} windows of {args.max_length} tokens)")
        return 0
    lines = _lines(args.text)[:args.samples]
    batch = dict(tokenizer(lines, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt"))
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(mean_pool(base, batch), mean_pool(model, batch), dim=-1)
    print(f"fidelity (mean cosine of mean-pooled embeddings, {len(lines)} samples): {float(cosine.mean()):.4f}")
    return 0


def _load(path: str, gguf_file: str | None):
    try:
        import transformers
    except ImportError as err:
        raise ImportError("the reparam command needs transformers: pip install 'reparam[minilm]'") from err
    transformers.logging.set_verbosity_error()
    import reparam  # noqa: F401  (makes converted checkpoints loadable by from_pretrained)

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    config = transformers.AutoConfig.from_pretrained(path, **extra)
    causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    model = auto.from_pretrained(path, **extra).eval()
    return model, transformers.AutoTokenizer.from_pretrained(path, **extra)


def _is_causal_lm(model) -> bool:
    return type(model).__name__.endswith("ForCausalLM")


def _lines(path: str) -> list[str]:
    lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path} has no non-empty lines")
    return lines


if __name__ == "__main__":
    sys.exit(main())
