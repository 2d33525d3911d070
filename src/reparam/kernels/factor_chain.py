"""y = (x·Aᵀ)·Bᵀ + b: the inference forward of the factorized layers
(low_rank: A = V, B = U; dense_sparse on CPU: A = its S made dense, B = D).

At a few tokens on CPU, in eager mode, one call into the compiled entry
(``csrc/factor_chain.cpp``) runs both products as row-blocked GEMVs: two
library GEMVs cost a fixed ~9 µs each at these shapes, more than their
arithmetic, so a 0.5-size low_rank layer was no faster than the dense one at
384x384. Everywhere else (many tokens, autograd recording, other dtypes,
``torch.compile``, no compiler) it is ``F.linear`` twice.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .extension import compiled_entry

COMPILED_MAX_TOKENS = 8  # measured: 1.1-3.6x the library up to 8 tokens, 0.9-1.25x at 16 (docs/kernels.md)


def factor_chain_reference(x, first, second, bias=None):
    """The definition: two ``F.linear``."""
    return F.linear(F.linear(x, first), second, bias)


def factor_chain_linear(x, first, second, bias=None):
    """``factor_chain_reference`` on any device; the compiled GEMVs where they pay (see the module docstring)."""
    if x.is_cpu and not torch.compiler.is_compiling():
        entry = compiled_entry()
        if entry is not None:
            return entry.factor_chain_linear(x, first, second, bias, COMPILED_MAX_TOKENS)
    return factor_chain_reference(x, first, second, bias)
