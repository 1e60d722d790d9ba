"""Image checks for the build: find broken files, convert every image to 8-bit RGB, cap its size and hash it.

`check_image` is a pure function of a file and `max_side`, so it runs in worker processes. It decodes with the model's
own rules (`modeling_cnngemma.load_image`: EXIF orientation, per-band 2-98 percentile stretch of 16-bit data, bands
1-3 as R, G, B, tifffile for TIFFs Pillow cannot read), so training and captioning see the same pixels. Well-formed
RGB JPEG/PNG files within the size cap are stored byte for byte; everything else is decoded, converted and re-encoded.
Each kept image gets the sha256 of its stored bytes and a perceptual hash (`duplicates.perceptual_hash`).
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import ExifTags, Image, UnidentifiedImageError

from modeling_cnngemma.image_processing_cnngemma import TIFF_SIGNATURES, decode_tiff, needs_tifffile, to_rgb

from .duplicates import perceptual_hash

KEPT_FORMATS = ("JPEG", "PNG")


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


def check_image(path: str | Path, max_side: int = 1024, bands: tuple[int, int, int] = (0, 1, 2)) -> ImageCheck:
    """Check one image file and return the bytes to store (or the reason it cannot be used).

    The picture is decoded by `load_image`'s rules (the captioning side's decoder), so the stored image gives the
    pixels that captioning the same file gives. `bands`: as in `load_image`, for TIFFs read with tifffile.
    """
    path = Path(path)
    if not path.is_file():
        return ImageCheck(None, "missing: file not found", "missing")
    data = path.read_bytes()
    if not data:
        return ImageCheck(None, "zero-byte: the file is empty", "zero-byte")
    orientation = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            source_format, original_size = image.format, image.size
            if source_format == "TIFF" and needs_tifffile(image):
                orientation = image.getexif().get(ExifTags.Base.Orientation)
                raise UnidentifiedImageError(
                    f"Pillow cannot read TIFF mode {image.mode} with {image.tag_v2.get(277, 1)} bands"
                )
            if source_format == "JPEG" and max(image.size) > 2 * max_side:
                image.draft("RGB", (max_side, max_side))  # decode big JPEGs at reduced scale: much faster
            image.load()
            converted_from = None if image.mode == "RGB" else f"mode {image.mode}"
            decoded_size = image.size
            image = to_rgb(image)  # upright (EXIF orientation) 8-bit RGB
            if image.size != decoded_size:  # turned by 90 degrees: the cap applies to the upright picture
                original_size = original_size[::-1]
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
        if data[:4] not in TIFF_SIGNATURES:
            if isinstance(error, UnidentifiedImageError):
                message = "cannot identify image file (not an image format Pillow reads)"
            return ImageCheck(None, f"unreadable: {type(error).__name__}: {message}", "unreadable")
        try:
            image, converted_from = decode_tiff(io.BytesIO(data), orientation, bands)
        except Exception as tiff_error:  # noqa: BLE001 - any tifffile failure (or no tifffile) makes it unreadable
            return ImageCheck(None, f"unreadable: {type(tiff_error).__name__}: {tiff_error}", "unreadable")
        source_format, original_size = "TIFF", image.size
    downscaled_from = None
    if max(original_size) > max_side:
        downscaled_from = original_size
        scale = max_side / max(original_size)
        size = (max(1, round(original_size[0] * scale)), max(1, round(original_size[1] * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    if converted_from is None and downscaled_from is None and source_format in KEPT_FORMATS:
        stored = data  # an EXIF orientation tag stays in it: `datasets` and `load_image` both apply it
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
