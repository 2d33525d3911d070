"""Giving freed memory back to the operating system during a conversion.

glibc keeps most freed blocks in its heap instead of returning them: during
a sequential conversion the fits' temporaries and the spilled originals
pile up there, and the process's resident memory keeps growing although
little of it is in use. ``malloc_trim(0)`` returns the free pages. On SmolLM2
(low_rank 0.8, first 8 blocks, with spilling) the process peaked 284 MiB and
ended 248 MiB above its loaded size without trimming, and 194 / 24 MiB with
a trim after each layer (docs/llm.md, "Memory").

Trimming between layers does not bound what a fit holds while it runs:
glibc raises its mmap threshold to the size of each large block freed (up to
32 MiB), so a fit's (in, in) float64 temporaries soon come from the heap,
where freed ones wait for the next trim. ``bounded_heap`` fixes the threshold
at 1 MiB for the conversion, so such blocks go back to the system when freed:
dense_sparse-0.8 with tuning, first 6 SmolLM2 blocks, peaked 22.8% over the
loaded process without it and 18.4% with it, fitting the same tensors in
the same time (docs/llm.md).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
from typing import Iterator

# mallopt's parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
CONVERSION_THRESHOLD = 1 << 20
# Where glibc's own adaptation ends after large frees (DEFAULT_MMAP_THRESHOLD_MAX, and twice it for trimming):
# glibc has no call to read the thresholds back, nor one to resume adapting, so a conversion leaves these.
MMAP_THRESHOLD_AFTER, TRIM_THRESHOLD_AFTER = 32 << 20, 64 << 20


@functools.cache
def _glibc(name: str):
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None), name, None)  # None with a libc other than glibc (musl)
    except OSError:
        return None


def release_free_memory() -> None:
    """Return the heap's free pages to the operating system (glibc, where this
    matters most); other C libraries have no such call, and it does nothing."""
    trim = _glibc("malloc_trim")
    if trim is not None:
        trim(0)


@contextlib.contextmanager
def bounded_heap() -> Iterator[None]:
    """Inside: large blocks are returned to the system as soon as they are freed (glibc; elsewhere nothing
    changes). After: glibc's thresholds as its own adaptation leaves them after large frees."""
    mallopt = _glibc("mallopt")
    if mallopt is None:
        yield
        return
    mallopt(M_MMAP_THRESHOLD, CONVERSION_THRESHOLD)
    mallopt(M_TRIM_THRESHOLD, CONVERSION_THRESHOLD)
    try:
        yield
    finally:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_AFTER)
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_AFTER)
