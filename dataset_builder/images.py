"""Image checks for the build: find broken files, convert every image to 8-bit RGB, cap its size and hash it.

`check_image` is a pure function of a file and `max_side`, so it runs in worker processes. Well-formed RGB JPEG/PNG
files within the size cap are stored byte for byte; everything else is decoded, converted and re-encoded. Each kept
image gets the sha256 of its stored bytes and a perceptual hash (`duplicates.perceptual_hash`) of the decoded picture.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .duplicates import perceptual_hash

KEPT_FORMATS = ("JPEG", "PNG")
HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


@dataclass(frozen=True)
class ImageCheck:
    """The outcome for one file: `data` is what gets stored, None when the file is broken (`problem` says why)."""

    data: bytes | None
    problem: str | None = None  # reason for a dropped row, one of the BROKEN kinds followed by details
    kind: str | None = None  # "missing", "zero-byte", "unreadable", "truncated"
    converted_from: str | None = None  # "mode CMYK", "TIFF uint16 48x64x5": what was converted to RGB
    downscaled_from: tuple[int, int] | None = None
    size: tuple[int, int] | None = None
    sha256: str | None = None  # of the stored bytes
    phash: str | None = None  # perceptual hash of the stored picture, to find near-duplicate images


def _stretch(array: np.ndarray) -> np.ndarray:
    """Map high-bit-depth bands to uint8 with a per-band 2-98 percentile stretch (usual for remote sensing)."""
    array = array.astype(np.float32)
    if array.ndim == 2:
        array = array[:, :, None]
    low = np.percentile(array, 2, axis=(0, 1))
    high = np.percentile(array, 98, axis=(0, 1))
    scaled = (array - low) / np.maximum(high - low, 1e-6)
    return (np.clip(scaled, 0, 1) * 255 + 0.5).astype(np.uint8)


def _bands_to_rgb(array: np.ndarray) -> Image.Image:
    """An (H, W) or (H, W, C) array of any dtype -> RGB: first three bands, gray repeated when there is one band."""
    if array.ndim == 3 and array.shape[0] < min(array.shape[1:]) and array.shape[0] <= 16:
        array = np.moveaxis(array, 0, -1)  # (C, H, W) -> (H, W, C), as tifffile returns planar files
    if array.dtype != np.uint8:
        array = _stretch(array)
    if array.ndim == 2:
        array = array[:, :, None]
    bands = array.shape[2]
    rgb = np.repeat(array[:, :, :1], 3, axis=2) if bands < 3 else array[:, :, :3]
    return Image.fromarray(np.ascontiguousarray(rgb), "RGB")


def _open_tiff_with_tifffile(data: bytes) -> tuple[Image.Image, str] | None:
    """Read a TIFF that Pillow cannot (multi-band, 16-bit RGB, float); return the RGB image and a description."""
    try:
        import tifffile
    except ImportError:
        return None
    try:
        array = tifffile.imread(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - any tifffile failure means the file is unreadable; Pillow's error is reported
        return None
    return _bands_to_rgb(array), f"TIFF {array.dtype} {'x'.join(map(str, array.shape))}"


def _needs_tifffile(image: Image.Image) -> bool:
    """Pillow reads a 16-bit RGB TIFF as its high bytes and a multi-band one as its first band: use tifffile."""
    bits = image.tag_v2.get(258, (8,))
    bands = image.tag_v2.get(277, 1)
    return max(bits if isinstance(bits, tuple) else (bits,)) > 8 and bands > 1 or bands > 4


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in HIGH_DEPTH_MODES:
        return _bands_to_rgb(np.asarray(image))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def check_image(path: str | Path, max_side: int = 1024) -> ImageCheck:
    """Check one image file and return the bytes to store (or the reason it cannot be used)."""
    path = Path(path)
    if not path.is_file():
        return ImageCheck(None, "missing: file not found", "missing")
    data = path.read_bytes()
    if not data:
        return ImageCheck(None, "zero-byte: the file is empty", "zero-byte")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            source_format, original_size = image.format, image.size
            if source_format == "TIFF" and _needs_tifffile(image):
                raise UnidentifiedImageError(
                    f"Pillow cannot read TIFF mode {image.mode} with {image.tag_v2.get(277, 1)} bands"
                )
            if source_format == "JPEG" and max(image.size) > 2 * max_side:
                image.draft("RGB", (max_side, max_side))  # decode big JPEGs at reduced scale: much faster
            image.load()
    except (
        UnidentifiedImageError,
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombWarning,
        Image.DecompressionBombError,
    ) as error:
        message = str(error)
        if "truncated" in message:
            return ImageCheck(None, f"truncated: {message}", "truncated")
        fallback = _open_tiff_with_tifffile(data) if data[:4] in (b"II*\x00", b"MM\x00*") else None
        if fallback is None:
            if isinstance(error, UnidentifiedImageError):
                message = "cannot identify image file (not an image format Pillow reads)"
            return ImageCheck(None, f"unreadable: {type(error).__name__}: {message}", "unreadable")
        image, converted_from = fallback
        source_format, original_size = "TIFF", image.size
    else:
        converted_from = None if image.mode == "RGB" else f"mode {image.mode}"
        if image.mode != "RGB":
            image = _to_rgb(image)
    downscaled_from = None
    if max(original_size) > max_side:
        downscaled_from = original_size
        scale = max_side / max(original_size)
        size = (max(1, round(original_size[0] * scale)), max(1, round(original_size[1] * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    if converted_from is None and downscaled_from is None and source_format in KEPT_FORMATS:
        stored = data
    else:
        buffer = io.BytesIO()
        if source_format == "JPEG":
            image.save(buffer, "JPEG", quality=95)
        else:
            image.save(buffer, "PNG")
        stored = buffer.getvalue()
    return ImageCheck(
        stored,
        None,
        None,
        converted_from,
        downscaled_from,
        image.size,
        hashlib.sha256(stored).hexdigest(),
        perceptual_hash(image),
    )
