"""The reference caption-cleaning rule for RISCM, as pure functions.

Per image: captions are NFC-normalised and stripped; captions equal after ``lower()`` are duplicates, the first
occurrence is kept in its normalised, stripped form; empty captions (nothing left, or only invisible characters such
as U+200B) are dropped. Pairs are ordered as the reference: every image's first kept caption, then every image's
second, and so on.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Characters that show nothing: format characters (zero-width spaces and joiners, U+FEFF, bidi marks: Unicode
# category Cf) and control characters (Cc); white space is stripped anyway.
INVISIBLE_CATEGORIES = ("Cf", "Cc")


@dataclass(frozen=True)
class CleanedCaptions:
    """The kept captions of one image, with what was removed."""

    kept: tuple[str, ...]
    duplicates: int
    empties: int
    invisible: tuple[int, ...] = ()  # table positions of captions dropped as empty that were not blank to the eye


def normalise(caption: str) -> str:
    """A caption as it is kept: NFC (one spelling for é and e + U+0301), surrounding white space removed."""
    return unicodedata.normalize("NFC", caption).strip()


def is_invisible(text: str) -> bool:
    """Whether `text` shows nothing: every character is white space, a format or a control character."""
    return all(char.isspace() or unicodedata.category(char) in INVISIBLE_CATEGORIES for char in text)


def describe_invisible(text: str) -> str:
    """The characters of an invisible caption by code point, e.g. 'U+200B ZERO WIDTH SPACE x2'."""
    counts: dict[str, int] = {}
    for char in text:
        counts[char] = counts.get(char, 0) + 1
    return ", ".join(
        f"U+{ord(char):04X} {unicodedata.name(char, 'control character')}" + (f" x{count}" if count > 1 else "")
        for char, count in counts.items()
    )


def clean_captions(captions: Iterable[str]) -> CleanedCaptions:
    """Apply the reference rule to one image's captions, in their table order."""
    seen: set[str] = set()
    kept: list[str] = []
    invisible: list[int] = []
    duplicates = empties = 0
    for position, caption in enumerate(captions):
        text = normalise(caption)
        if is_invisible(text):
            empties += 1
            if text:
                invisible.append(position)
            continue
        key = text.lower()
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        kept.append(text)
    return CleanedCaptions(tuple(kept), duplicates, empties, tuple(invisible))


def reference_order(kept_per_image: Sequence[Sequence[str]]) -> list[tuple[int, str]]:
    """Return (image index, caption) pairs: all first captions in image order, then all second captions, ...

    This is the order of RISCM's published ``train.csv``/``val.csv``/``test.csv``.
    """
    depth = max((len(kept) for kept in kept_per_image), default=0)
    return [
        (index, kept[rank]) for rank in range(depth) for index, kept in enumerate(kept_per_image) if rank < len(kept)
    ]
