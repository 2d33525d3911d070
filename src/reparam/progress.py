"""Progress bars through tqdm when it is installed (the ``progress`` extra)."""
from __future__ import annotations

from typing import Iterable, TypeVar

T = TypeVar("T")


def progress_bar(items: Iterable[T], *, desc: str, disable: bool = False,
                 total: int | None = None) -> Iterable[T]:
    if disable:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, total=total, leave=False)
