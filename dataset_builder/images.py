"""Image checks for the build: find broken files, convert every image to 8-bit RGB, cap its size and hash it.

`check_image` is a pure function of a file, `max_side` and `nodata`, so it runs in worker processes. It decodes with
the model's own rules (`modeling_cnngemma.load_image`: EXIF orientation, per-band 2-98 percentile stretch of 16-bit and
float data over valid pixels, bands 1-3 as R, G, B, tifffile for TIFFs Pillow cannot read, PIXEL_LIMIT), so training
and captioning see the same pixels. A path is checked to be a regular file, and its header read, before anything
else; well-formed RGB JPEG/PNG files within the size cap are stored byte for byte (the only case that reads a file
whole, and only when its size fits its pixels); everything else is decoded, converted and re-encoded. Each kept image
gets the sha256 of its stored bytes and a perceptual hash (`duplicates.perceptual_hash`).
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import ExifTags, Image, UnidentifiedImageError

from modeling_cnngemma.image_processing_cnngemma import (
    TIFF_SIGNATURES,
    NoValidPixelsError,
    declared_nodata,
    decode_tiff,
    needs_tifffile,
    nodata_values,
    not_a_file,
    open_image,
    reduce_to_limit,
    to_rgb,
)

from .duplicates import perceptual_hash

KEPT_FORMATS = ("JPEG", "PNG")
# A file stored byte for byte is read whole: one far larger than its pixels need (data after the picture, or not a
# picture at all past its header) is re-encoded instead, so its size never reaches memory or the dataset.
SPARE_BYTES = 16 * 2**20  # metadata (EXIF, ICC, XMP) beyond the raw 8-bit pixels that a stored file may hold


@dataclass(frozen=True)
class ImageCheck:
    """The outcome for one file: `data` is what gets stored, None when the file is broken (`problem` says why)."""

    data: bytes | None
    problem: str | None = None  # reason for a dropped row, one of the BROKEN kinds followed by details
    kind: str | None = None  # "missing", "not a file", "zero-byte", "unreadable", "truncated", "too large", ...
    converted_from: str | None = None  # "mode CMYK", "TIFF uint16 48x64x5": what was converted to RGB
    downscaled_from: tuple[int, int] | None = None
    size: tuple[int, int] | None = None
    sha256: str | None = None  # of the stored bytes
    phash: str | None = None  # perceptual hash of the stored picture, to find near-duplicate images
    oversized: int | None = None  # the byte size of a kept-format file re-encoded because it was far too large


def missing(path: Path) -> ImageCheck:
    """The check of a path that names no file: a broken symlink says where it leads."""
    if path.is_symlink():
        return ImageCheck(None, f"missing: a symlink to {os.readlink(path)}, which does not exist", "missing")
    return ImageCheck(None, "missing: file not found", "missing")


def check_image(
    path: str | Path, max_side: int = 1024, bands: tuple[int, int, int] = (0, 1, 2), nodata: float | None = None
) -> ImageCheck:
    """Check one image file and return the bytes to store (or the reason it cannot be used).

    The picture is decoded by `load_image`'s rules (the captioning side's decoder), so the stored image gives the
    pixels that captioning the same file gives. `bands` and `nodata`: as in `load_image`. The file's type, size and
    header are checked before anything else is read; it is read whole only when it is stored byte for byte.
    """
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return missing(path)
    if (reason := not_a_file(info.st_mode)) is not None:
        return ImageCheck(None, f"not a file: {reason}", "not a file")
    if info.st_size == 0:
        return ImageCheck(None, "zero-byte: the file is empty", "zero-byte")
    with open(path, "rb") as file:
        return _check_open_file(file, info.st_size, max_side, bands, nodata)


def _check_open_file(file, file_size: int, max_side: int, bands, nodata) -> ImageCheck:
    orientation, image, failure = None, None, None
    try:
        image, original_size = open_image(file, draft_side=max_side)
        source_format = image.format
        if source_format == "TIFF" and needs_tifffile(image):
            orientation = image.getexif().get(ExifTags.Base.Orientation)
            raise UnidentifiedImageError(
                f"Pillow cannot read TIFF mode {image.mode} with {image.tag_v2.get(277, 1)} bands"
            )
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        failure = error
    if failure is None:
        converted_from = None if image.mode == "RGB" else f"mode {image.mode}"
        declared = declared_nodata(image)  # read first: the tags do not go with a reduced copy
        image = reduce_to_limit(image)  # a full decode above PIXEL_LIMIT is freed here
        try:
            picture = to_rgb(image, nodata_values(declared, nodata))  # upright 8-bit RGB
        except NoValidPixelsError as error:
            return ImageCheck(None, str(error), "no valid pixels")
        if picture.size != image.size:  # turned by 90 degrees: the cap applies to the upright picture
            original_size = original_size[::-1]
    else:
        if isinstance(failure, Image.DecompressionBombError):
            return ImageCheck(None, f"too large: {failure}", "too large")
        message = str(failure)
        if "truncated" in message:
            return ImageCheck(None, f"truncated: {message}", "truncated")
        file.seek(0)
        if file.read(4) not in TIFF_SIGNATURES:
            if isinstance(failure, UnidentifiedImageError):
                message = "cannot identify image file (not an image format Pillow reads)"
            return ImageCheck(None, f"unreadable: {type(failure).__name__}: {message}", "unreadable")
        file.seek(0)
        try:
            picture, converted_from, original_size = decode_tiff(file, orientation, bands, nodata)
        except NoValidPixelsError as error:
            return ImageCheck(None, str(error), "no valid pixels")
        except Image.DecompressionBombError as error:
            return ImageCheck(None, f"too large: {error}", "too large")
        except Exception as tiff_error:  # noqa: BLE001 - any tifffile failure (or no tifffile) makes it unreadable
            return ImageCheck(None, f"unreadable: {type(tiff_error).__name__}: {tiff_error}", "unreadable")
        source_format = "TIFF"
    downscaled_from = None
    if max(original_size) > max_side or picture.size != original_size:  # --max-side, or reduced to PIXEL_LIMIT
        downscaled_from = original_size
        scale = min(1, max_side / max(original_size))
        size = (max(1, round(original_size[0] * scale)), max(1, round(original_size[1] * scale)))
        if scale < 1:  # else the reduced picture is the stored one
            picture = picture.resize(size, Image.Resampling.LANCZOS)
    width, height = picture.size
    oversized = file_size if file_size > 3 * width * height + SPARE_BYTES else None
    if converted_from is None and downscaled_from is None and source_format in KEPT_FORMATS and not oversized:
        file.seek(0)
        stored = file.read()  # an EXIF orientation tag stays in it: `datasets` and `load_image` both apply it
    else:
        buffer = io.BytesIO()
        if source_format == "JPEG":
            picture.save(buffer, "JPEG", quality=95)
        else:
            picture.save(buffer, "PNG")
        stored = buffer.getvalue()
    return ImageCheck(
        stored,
        None,
        None,
        converted_from,
        downscaled_from,
        picture.size,
        hashlib.sha256(stored).hexdigest(),
        perceptual_hash(picture),
        oversized,
    )
