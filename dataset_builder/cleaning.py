"""The reference caption-cleaning rule for RISCM, as pure functions.

Per image: captions equal after ``strip().lower()`` are duplicates, the first occurrence is kept in its stripped
form, empty captions are dropped. Pairs are ordered as the reference: every image's first kept caption, then every
image's second, and so on.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class CleanedCaptions:
    """The kept captions of one image, with what was removed."""

    kept: tuple[str, ...]
    duplicates: int
    empties: int


def clean_captions(captions: Iterable[str]) -> CleanedCaptions:
    """Apply the reference rule to one image's captions, in their table order."""
    seen: set[str] = set()
    kept: list[str] = []
    duplicates = empties = 0
    for caption in captions:
        stripped = caption.strip()
        if not stripped:
            empties += 1
            continue
        key = stripped.lower()
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        kept.append(stripped)
    return CleanedCaptions(tuple(kept), duplicates, empties)


def reference_order(kept_per_image: Sequence[Sequence[str]]) -> list[tuple[int, str]]:
    """Return (image index, caption) pairs: all first captions in image order, then all second captions, ...

    This is the order of RISCM's published ``train.csv``/``val.csv``/``test.csv``.
    """
    depth = max((len(kept) for kept in kept_per_image), default=0)
    return [
        (index, kept[rank]) for rank in range(depth) for index, kept in enumerate(kept_per_image) if rank < len(kept)
    ]
