"""Duplicate images for `build`: exact copies (same stored bytes) and near copies (256-bit perceptual hashes at most
`NEAR_DISTANCE` bits apart), among all pairs of images within and across splits.

The hash is `imagehash.phash` with `hash_size=16`: the signs of the 16x16 lowest DCT frequencies of a 64x64 grey
thumbnail against their median. The threshold comes from synthetic aerial scenes (`synth.make_example`, 12,800 images
of 13 alike scene kinds, 128-1024 px): copies re-encoded at JPEG quality 70 or resized to 80% were at most 24 bits
from their original, distinct images at least 36 bits apart (27 million pairs). Crops shift every frequency: a third
of the copies with 2% cut off each side stay within `NEAR_DISTANCE`, almost none with 5%.
"""

from __future__ import annotations

from dataclasses import dataclass

import imagehash
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

HASH_SIZE = 16
HASH_BITS = HASH_SIZE * HASH_SIZE
NEAR_DISTANCE = 32
BLOCK = (256, 4096)  # hash pairs compared at once: about 11 MiB of scratch arrays


def perceptual_hash(image: Image.Image) -> str:
    """The image's 256-bit perceptual hash as 64 hex digits: `imagehash.phash` of a 64 px grey thumbnail."""
    # phash would make the thumbnail with LANCZOS, which takes most of its time. An antialiased BILINEAR thumbnail
    # (box-reduced first when large, which Pillow says is indistinguishable at reducing_gap 3) costs a third and
    # gives re-encoded and resized copies the same distances; phash's own resize of it is then a copy.
    side = 4 * HASH_SIZE
    thumbnail = image.convert("L").resize((side, side), Image.Resampling.BILINEAR, reducing_gap=3.0)
    bits = imagehash.phash(thumbnail, hash_size=HASH_SIZE).hash
    return np.packbits(bits).tobytes().hex()  # str(ImageHash)'s digits, without its Python loop over the bits


@dataclass(frozen=True)
class Duplicate:
    """Images `first` < `second` (indices into the lists given to `find_duplicates`) are copies of one picture."""

    first: int
    second: int
    distance: int  # Hamming distance of the perceptual hashes, in bits
    exact: bool  # same stored bytes (equal sha256)


def hash_words(hashes: list[str]) -> np.ndarray:
    """Hex hashes -> (N, HASH_BITS // 64) uint64, so that XOR and a bit count give Hamming distances."""
    words = HASH_BITS // 64
    wrong = [value for value in hashes if len(value) != HASH_BITS // 4]
    if wrong:
        raise ValueError(
            f"perceptual hash {wrong[0]!r} has {len(wrong[0])} hex digits; expected {HASH_BITS // 4} "
            f"(imagehash.phash with hash_size={HASH_SIZE}). Fix: compute the hashes with perceptual_hash()."
        )
    return np.frombuffer(bytes.fromhex("".join(hashes)), ">u8").reshape(len(hashes), words).astype(np.uint64)


def near_pairs(words: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair i < j of rows of `words` (N, 4) whose Hamming distance is at most `max_distance` (< 128).

    Returns the index arrays i and j and the distances, sorted by i then j.
    """
    if words.ndim != 2 or words.shape[1] != HASH_BITS // 64 or not 0 <= max_distance < HASH_BITS // 2:
        raise ValueError(
            f"near_pairs got hashes of shape {words.shape} and max_distance {max_distance}; expected (N, 4) uint64 "
            "words (256-bit hashes, from hash_words) and 0 <= max_distance < 128."
        )
    count = len(words)
    first, second = np.ascontiguousarray(words[:, 0]), np.ascontiguousarray(words[:, 1])
    xor = np.empty(BLOCK, np.uint64)
    low, high = np.empty(BLOCK, np.uint8), np.empty(BLOCK, np.uint8)
    found_i, found_j = [], []
    for start in tqdm(range(0, count, BLOCK[0]), desc="pairing image hashes", unit="block", mininterval=1.0):
        stop = min(count, start + BLOCK[0])
        for column in range(start, count, BLOCK[1]):
            end = min(count, column + BLOCK[1])
            tile = (slice(0, stop - start), slice(0, end - column))
            # A pair within max_distance on 256 bits is within it on the first 128. Unrelated images differ on
            # about half of those, so this test at half the cost rejects nearly every pair; the few left are
            # counted in full below.
            np.bitwise_xor(first[start:stop, None], first[None, column:end], out=xor[tile])
            np.bitwise_count(xor[tile], out=low[tile])
            np.bitwise_xor(second[start:stop, None], second[None, column:end], out=xor[tile])
            np.bitwise_count(xor[tile], out=high[tile])
            low[tile] += high[tile]
            i, j = np.nonzero(low[tile] <= max_distance)
            i, j = i + start, j + column
            upper = j > i
            found_i.append(i[upper])
            found_j.append(j[upper])
    i, j = np.concatenate(found_i), np.concatenate(found_j)
    distance = np.bitwise_count(words[i] ^ words[j]).sum(axis=1, dtype=np.int64)
    close = distance <= max_distance
    i, j, distance = i[close], j[close], distance[close]
    order = np.lexsort((j, i))
    return i[order], j[order], distance[order]


def find_duplicates(sha256s: list[str], hashes: list[str], max_distance: int = NEAR_DISTANCE) -> list[Duplicate]:
    """All pairs of images that are exact or near copies, sorted by the later image, then the earlier one.

    `sha256s[k]` is the digest of image k's stored bytes, `hashes[k]` its `perceptual_hash`.
    """
    if len(sha256s) != len(hashes):
        raise ValueError(
            f"find_duplicates got {len(sha256s)} sha256 digests and {len(hashes)} perceptual hashes; expected one "
            "of each per image."
        )
    if not hashes:
        return []
    # Equal stored bytes decode to the same picture and so to the same hash: exact copies are among the pairs at
    # distance 0, told apart from near copies by their sha256.
    i, j, distance = near_pairs(hash_words(hashes), max_distance)
    pairs = [
        Duplicate(int(a), int(b), int(d), sha256s[a] == sha256s[b])
        for a, b, d in zip(i.tolist(), j.tolist(), distance.tolist(), strict=True)
    ]
    return sorted(pairs, key=lambda pair: (pair.second, pair.first))
