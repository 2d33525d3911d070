"""Giving freed memory back to the operating system during a conversion.

glibc keeps most freed blocks in its heap instead of returning them: during
a sequential conversion the fits' temporaries and the spilled originals
pile up there, and the process's resident memory keeps growing although
little of it is in use. ``malloc_trim(0)`` returns the free pages. On SmolLM2
(low_rank 0.8, first 8 blocks, with spilling) the process peaked 284 MiB and
ended 248 MiB above its loaded size without trimming, and 194 / 24 MiB with
a trim after each layer (docs/llm.md, "Memory").
"""
from __future__ import annotations

import ctypes
import functools
import sys


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)  # None with a libc other than glibc (musl)
    except OSError:
        return None


def release_free_memory() -> None:
    """Return the heap's free pages to the operating system (glibc, where this
    matters most); other C libraries have no such call, and it does nothing."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
