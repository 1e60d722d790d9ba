"""Image decoding and processing for CNNGemma: any file or PIL mode -> upright 8-bit RGB -> square resize -> normalise.

`load_image` decodes a file as CNNGemma's training data were decoded, so a file gives the same pixels in training and
captioning. Aerial captions talk about corners and edges, so the whole image is kept: it is resized, never cropped.
"""

import io
import math
import os
import stat
import warnings

import numpy as np
import timm
import torch
from PIL import ExifTags, Image, ImageOps, JpegImagePlugin, UnidentifiedImageError
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

RESAMPLE = {
    "nearest": PILImageResampling.NEAREST,
    "bilinear": PILImageResampling.BILINEAR,
    "bicubic": PILImageResampling.BICUBIC,
    "lanczos": PILImageResampling.LANCZOS,
}
HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # TIFF and BigTIFF, both byte orders
JPEG_SIGNATURE = b"\xff\xd8\xff"
# A decoded picture holds at most this many pixels: larger ones are decoded at 1/2, 1/4 or 1/8 scale (JPEG) or
# reduced right after decoding (other formats), so one huge file cannot take gigabytes of memory.
PIXEL_LIMIT = 100_000_000
# Formats without reduced-scale decoding are decoded in full first: above this, a file is refused as a possible
# decompression bomb (a few KB of PNG can claim 100000x100000 pixels). Pillow's own limit applies too.
FULL_DECODE_LIMIT = 2 * PIXEL_LIMIT
GDAL_NODATA = 42113  # the TIFF tag in which GDAL and rasterio declare a raster's no-data value, as text ("-9999")
# Image.reduce averages blocks of pixels; these modes hold labels (palette indices, bits) or data whose fill value
# must stay exact for the stretch, so they keep every k-th pixel instead
NEAREST_MODES = ("1", "P", "I;16", "I;16L", "I;16B", "I;16N", "I", "F")
# EXIF orientation -> the transpose that shows the picture upright (the table ImageOps.exif_transpose applies), for
# TIFFs decoded by tifffile, which returns the pixels as stored
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class NoValidPixelsError(ValueError):
    """Every value of the bands shown is NaN, infinite or no data: there is no picture, only a black square."""


def parse_nodata(text) -> float | None:
    """A GDAL_NODATA tag's text ("-9999", "nan", b"0\x00") as a number, or None when it holds none."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    try:
        return float(str(text).strip().strip("\x00").replace(",", "."))
    except ValueError:
        return None


def nodata_values(*items) -> tuple[float, ...]:
    """The no-data values among `items` (None, numbers or sequences of them), as one flat tuple."""
    values = []
    for item in items:
        if isinstance(item, (tuple, list)):
            values += nodata_values(*item)
        elif item is not None:
            values.append(float(item))
    return tuple(dict.fromkeys(values))


def declared_nodata(image: Image.Image) -> float | None:
    """The no-data value a TIFF declares in its GDAL_NODATA tag, or None."""
    tags = getattr(image, "tag_v2", None)
    return None if tags is None or GDAL_NODATA not in tags else parse_nodata(tags[GDAL_NODATA])


def invalid_values(array: np.ndarray, nodata=None) -> np.ndarray | None:
    """A mask of the values that are NaN, infinite or equal to `nodata` (a number, or several), or None if none are.

    A no-data value is compared in the array's own type, as GDAL does; one the type cannot hold matches nothing.
    """
    invalid = None
    if array.dtype.kind == "f":  # integers cannot be NaN or infinite
        finite = np.isfinite(array)
        if not finite.all():
            invalid = ~finite
    for value in nodata_values(nodata):
        if not math.isfinite(value):  # NaN and infinity are invalid anyway
            continue
        if array.dtype.kind in "iu":
            info = np.iinfo(array.dtype)
            if not (float(value).is_integer() and info.min <= value <= info.max):
                continue
            value = int(value)
        elif array.dtype.kind == "f":
            value = array.dtype.type(value)
        hit = array == value
        if hit.any():
            invalid = hit if invalid is None else invalid | hit
    return invalid


def no_valid_pixels(nodata=None) -> NoValidPixelsError:
    shown = " or ".join(f"{value:g}" for value in nodata_values(nodata) if math.isfinite(value))
    invalid = f"NaN, infinite or the no-data value {shown}" if shown else "NaN or infinite"
    return NoValidPixelsError(f"no valid pixels: every value is {invalid}, so there is no picture to show")


def stretch(array: np.ndarray, nodata=None) -> np.ndarray:
    """Maps high-bit-depth bands to uint8 with a per-band 2-98 percentile stretch (usual for remote sensing).

    The percentiles are those of the valid values: NaN, infinite values and `nodata` (a number, or several) are left
    out and shown as 0. Raises `NoValidPixelsError` when no value is valid.
    """
    if array.ndim == 2:
        array = array[:, :, None]
    invalid = invalid_values(array, nodata)
    array = array.astype(np.float32)
    if invalid is None:
        low = np.percentile(array, 2, axis=(0, 1))
        high = np.percentile(array, 98, axis=(0, 1))
    else:
        if invalid.all():
            raise no_valid_pixels(nodata)
        low, high = np.zeros(array.shape[2], np.float32), np.ones(array.shape[2], np.float32)
        for band in range(array.shape[2]):
            values = array[:, :, band][~invalid[:, :, band]]
            if values.size:  # a band without a valid value stays 0
                low[band], high[band] = np.percentile(values, 2), np.percentile(values, 98)
        array[invalid] = low.max()  # any finite value: these pixels are set to 0 below
    scaled = (array - low) / np.maximum(high - low, 1e-6)
    result = (np.clip(scaled, 0, 1) * 255 + 0.5).astype(np.uint8)
    if invalid is not None:
        result[invalid] = 0
    return result


def bands_to_rgb(array: np.ndarray, bands: tuple[int, int, int] = (0, 1, 2), nodata=None) -> Image.Image:
    """An (H, W), (H, W, C) or planar (C, H, W) array of any dtype -> RGB. Non-uint8 data is stretched per band over
    its valid values (see `stretch`; `nodata`: a value that marks missing pixels); `bands` are shown as R, G, B
    (default the first three); one or two bands give grey (the first band repeated). An array above PIXEL_LIMIT pixels
    keeps every k-th row and column."""
    if array.ndim == 3 and array.shape[0] < min(array.shape[1:]) and array.shape[0] <= 16:
        array = np.moveaxis(array, 0, -1)  # (C, H, W) -> (H, W, C), as tifffile returns planar files
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or 0 in array.shape:
        raise ValueError(f"Expected image data of shape (H, W) or (H, W, bands) with pixels, got shape {array.shape}.")
    count = array.shape[2]
    if count < 3:
        array = array[:, :, [0, 0, 0]]
    elif len(bands) != 3 or not all(0 <= band < count for band in bands):
        raise ValueError(f"bands={bands}: expected three band indices in 0..{count - 1}, shown as R, G and B.")
    else:
        array = array[:, :, list(bands)]
    step = reduction(array.shape[1], array.shape[0])
    if step > 1:
        array = array[::step, ::step]  # exact values, so that no-data pixels stay recognisable
    if array.dtype != np.uint8:
        array = stretch(array, nodata)
    elif (invalid := invalid_values(array, nodata)) is not None and invalid.all():
        raise no_valid_pixels(nodata)
    return Image.fromarray(np.ascontiguousarray(array), "RGB")


def reduction(width: int, height: int) -> int:
    """The smallest whole factor k that brings a width x height picture to at most PIXEL_LIMIT pixels."""
    step = max(1, math.ceil(math.sqrt(width * height / PIXEL_LIMIT)))
    while math.ceil(width / step) * math.ceil(height / step) > PIXEL_LIMIT:
        step += 1
    return step


def not_a_file(mode: int) -> str | None:
    """Why a path with this `os.stat` mode is no image file (a folder, a FIFO that would block a read), or None."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder, not an image file"
    kind = "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device file"
    return f"{kind}, not a regular file"


BOMB_FIX = "If the picture is real, downscale it first (e.g. gdal_translate -outsize 25% 25% IN OUT)."


def bomb(width: int, height: int) -> Image.DecompressionBombError:
    return Image.DecompressionBombError(
        f"Image size ({width}x{height} = {width * height:,} pixels) exceeds the limit of {FULL_DECODE_LIMIT:,} "
        f"pixels decoded in full: refused as a possible decompression bomb. {BOMB_FIX}"
    )


def open_image(file, draft_side: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Pillow's lazy open of a binary file object (it reads the header only) and the size the file holds, with
    CNNGemma's size rules in place of Pillow's decompression-bomb warning: a JPEG above PIXEL_LIMIT pixels is set to
    decode at 1/2, 1/4 or 1/8 scale, any other format is reduced after decoding (`reduce_to_limit`) and refused
    above FULL_DECODE_LIMIT. `draft_side`: also decode a JPEG larger than twice this side at a reduced scale."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # above PIXEL_LIMIT it is reduced
            image = Image.open(file)
    except Image.DecompressionBombError as error:
        file.seek(0)
        if file.read(3) != JPEG_SIGNATURE:
            raise Image.DecompressionBombError(f"{error} Refused. {BOMB_FIX}") from None
        file.seek(0)
        image = JpegImagePlugin.JpegImageFile(file)  # past Pillow's check, which knows no reduced-scale decoding
    width, height = image.size
    if isinstance(image, JpegImagePlugin.JpegImageFile):  # JPEG and MPO
        scale = next((s for s in (1, 2, 4, 8) if math.ceil(width / s) * math.ceil(height / s) <= PIXEL_LIMIT), 8)
        if draft_side and max(image.size) > 2 * draft_side and min(width, height) // draft_side >= scale:
            image.draft("RGB", (draft_side, draft_side))  # decode big JPEGs at reduced scale: much faster
        elif scale > 1:
            image.draft("RGB", (width // scale, height // scale))
    elif width * height > FULL_DECODE_LIMIT:
        raise bomb(width, height)
    return image, (width, height)


def reduce_to_limit(image: Image.Image) -> Image.Image:
    """A decoded image above PIXEL_LIMIT pixels reduced by a whole factor (block averages; every k-th pixel for
    palettes and raster data, whose values must stay exact), else the image itself."""
    step = reduction(*image.size)
    if step == 1:
        return image
    if image.mode in NEAREST_MODES:
        size = (math.ceil(image.width / step), math.ceil(image.height / step))
        return image.resize(size, Image.Resampling.NEAREST)
    return image.reduce(step)


def needs_tifffile(image: Image.Image) -> bool:
    """Pillow reads a 16-bit RGB TIFF as its high bytes and a multi-band one as its first band: use tifffile."""
    bits = image.tag_v2.get(258, (8,))
    bands = image.tag_v2.get(277, 1)
    return max(bits if isinstance(bits, tuple) else (bits,)) > 8 and bands > 1 or bands > 4


def decode_tiff(
    file, orientation: int | None = None, bands: tuple[int, int, int] = (0, 1, 2), nodata=None
) -> tuple[Image.Image, str, tuple[int, int]]:
    """A TIFF (a binary file object) read with tifffile -> (upright RGB image, e.g. "TIFF uint16 4x48x64", the
    upright size in the file: larger than the image's above PIXEL_LIMIT)."""
    try:
        import tifffile  # only these TIFFs need it, so a Hub user without it can still caption everything else
    except ImportError as error:
        raise ImportError(
            "This TIFF has more bands or bits per band than Pillow reads; reading it needs tifffile: "
            "pip install tifffile"
        ) from error
    with tifffile.TiffFile(file) as tiff:
        page = tiff.pages[0]
        if page.imagewidth * page.imagelength > FULL_DECODE_LIMIT:
            raise bomb(page.imagewidth, page.imagelength)
        tag = page.tags.get(GDAL_NODATA)  # not page.nodata: tifffile reports 0 for a TIFF that declares none
        declared = None if tag is None else parse_nodata(tag.value)
        array = tiff.asarray()
    image = bands_to_rgb(array, bands, (declared, nodata))
    size = (page.imagewidth, page.imagelength)
    if orientation in UPRIGHT:
        image = image.transpose(UPRIGHT[orientation])
        size = size if orientation < 5 else size[::-1]  # 5-8 turn the picture by 90 degrees
    return image, f"TIFF {array.dtype} {'x'.join(map(str, array.shape))}", size


def to_rgb(image: Image.Image, nodata=None) -> Image.Image:
    """A PIL image in any mode -> upright 8-bit RGB by `load_image`'s rules, for images the caller opened.
    (The processor calls it; a TIFF that Pillow misreads is refused: open it with `load_image` instead.)"""
    if hasattr(image, "tag_v2") and needs_tifffile(image):
        raise ValueError(
            f"This TIFF ({image.tag_v2.get(277, 1)} bands, bits per band {image.tag_v2.get(258)}) is one that Pillow "
            "reads wrongly (only the high bytes, or only the first band). Open it with "
            "processor.image_processor.load_image(path) instead of PIL.Image.open: it reads such TIFFs with tifffile."
        )
    nodata = nodata_values(declared_nodata(image), nodata)
    image = ImageOps.exif_transpose(image)  # as `datasets` does when it decodes a training image
    if image.mode in HIGH_DEPTH_MODES:  # PIL's convert would clip at 255
        return bands_to_rgb(np.asarray(image), nodata=nodata)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # Pillow warns when such a palette goes straight to RGB; same colours
    elif image.mode == "La":
        image = image.convert("LA")  # Pillow has no La -> RGB conversion
    # L, LA, P, PA, RGBA, CMYK, YCbCr, 1, ...: PIL knows the way; alpha is dropped, keeping the pixels under it
    image = image if image.mode == "RGB" else image.convert("RGB")  # a copy either way: exif_transpose made one
    image.info.pop("transparency", None)  # a transparent colour (PNG tRNS): transformers would paint it white
    if nodata:
        invalid = invalid_values(np.asarray(image), nodata)
        if invalid is not None and invalid.all():
            raise no_valid_pixels(nodata)
    return image


def open_file(name):
    """A path opened for reading, once it is known to be a regular file: a FIFO would block the read, a folder has
    no bytes. The file is read as needed, never whole."""
    reason = not_a_file(os.stat(name).st_mode)  # FileNotFoundError for a missing file or a broken symlink
    if reason is not None:
        error = IsADirectoryError if reason.startswith("a folder") else OSError
        raise error(f"{name!r} is {reason}")
    return open(name, "rb")


def load_image(source, bands: tuple[int, int, int] = (0, 1, 2), nodata: float | None = None) -> Image.Image:
    """Opens an image file as upright 8-bit RGB, as the training data were decoded: same file, same pixels.

    - EXIF orientation is applied, as `datasets` applies it when it decodes an image.
    - 8-bit modes convert as Pillow converts them; alpha is dropped, keeping the pixels under it.
    - 16-bit, 32-bit and float data get a per-band 2-98 percentile stretch to 0-255 (usual for remote sensing), over
      the valid values only: NaN, infinite values, the no-data value a TIFF declares (GDAL_NODATA, as GDAL and
      rasterio write it) and `nodata` are left out and shown as 0. A file without any valid value raises
      `NoValidPixelsError`.
    - Bands 1-3 are taken as R, G, B and further bands (e.g. near infrared) are dropped; one or two bands give grey.
      `bands` picks others for TIFFs read with tifffile, e.g. (2, 1, 0) for blue-green-red-NIR files; use the same
      value when building the dataset.
    - TIFFs that Pillow cannot read (16-bit colour, more than 4 bands, planar, ...) are read with `tifffile`.
    - A picture above PIXEL_LIMIT pixels is downscaled while decoding (JPEG) or right after; a file that claims more
      pixels than can be decoded safely raises `PIL.Image.DecompressionBombError`. A path is opened only when it is a
      regular file (a folder or a FIFO raises OSError) and read as decoding needs it, never whole.

    Args:
        source: a path, the file's bytes or a binary file object.
        nodata: a value that marks missing pixels where the file does not declare it (e.g. 0 for Landsat's
            collars), in addition to a declared one.
    """
    name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else None
    if name is not None:
        file = open_file(name)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        file = io.BytesIO(source)
    else:
        file = io.BytesIO(source.read())
    with file:
        return decode(file, name, bands, nodata)


def decode(file, name, bands, nodata) -> Image.Image:
    """`load_image` of an open binary file; `name` is its path, for messages."""
    # Decoded from a file object, as the training data were from bytes: Pillow memory-maps an uncompressed file
    # opened by path, and then skips a TIFF's orientation.
    orientation, failure = None, None
    try:
        image, _ = open_image(file)
        by_tifffile = image.format == "TIFF" and needs_tifffile(image)
        if by_tifffile:
            orientation = image.getexif().get(ExifTags.Base.Orientation)
        else:
            image.load()  # decodes now, so that a truncated file fails here
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        failure = error
    else:
        if not by_tifffile:
            declared = declared_nodata(image)  # read first: the tags do not go with a reduced copy
            image = reduce_to_limit(image)  # a full decode above PIXEL_LIMIT is freed here
            return to_rgb(image, nodata_values(declared, nodata))
    file.seek(0)
    if failure is not None and file.read(4) not in TIFF_SIGNATURES:
        if name is not None and isinstance(failure, UnidentifiedImageError):  # Pillow would name no file
            raise UnidentifiedImageError(f"cannot identify image file {name!r}") from None
        raise failure
    file.seek(0)  # Pillow cannot read this TIFF (right): tifffile may
    return decode_tiff(file, orientation, bands, nodata)[0]


# What transformers writes into a saved image processor's config beside the image kwargs; the constructor takes them.
SAVED_KEYS = frozenset({"image_processor_type", "processor_class", "auto_map", "_processor_class"})


class CNNGemmaImageProcessor(PilBackend):
    r"""
    Prepares images for CNNGemma's CNN with transformers' `PilBackend` (PIL resize, NumPy rescale and normalise).
    It is the one backend for training and captioning, so the same file gives the same pixels in both.

    Takes transformers' standard image kwargs (`size`, `do_resize`, `resample`, `do_normalize`, `image_mean`,
    `image_std`, ...) at construction or per call; any other kwarg raises. Defaults: the timm model's pretrained
    config (see `from_timm`), without its centre crop. `load_image(path)` opens a file as the training data were
    decoded (EXIF orientation, 16-bit stretch, TIFF bands); PIL images passed directly get the same conversion.
    """

    resample = PILImageResampling.BICUBIC
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    size = {"height": 224, "width": 224}
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    model_input_names = ["pixel_values"]
    # `processor.image_processor.load_image(path)`: code that has only the Hub model (a Space) opens files as training did
    load_image = staticmethod(load_image)

    def __init__(self, **kwargs):
        self.check_kwargs(kwargs, SAVED_KEYS)
        if isinstance(kwargs.get("resample"), str):  # a name: PilBackend would quietly resize bilinear instead
            if kwargs["resample"] not in RESAMPLE:
                raise ValueError(
                    f"resample={kwargs['resample']!r} is not supported; expected one of {tuple(RESAMPLE)}."
                )
            kwargs["resample"] = RESAMPLE[kwargs["resample"]]
        super().__init__(**kwargs)

    @classmethod
    def check_kwargs(cls, kwargs: dict, also: frozenset = frozenset()):
        if unknown := sorted(set(kwargs) - set(cls.valid_kwargs.__annotations__) - also):
            raise ValueError(
                f"CNNGemmaImageProcessor got unknown keyword argument(s) {unknown}; expected transformers' image "
                f"kwargs: {', '.join(sorted(cls.valid_kwargs.__annotations__))}."
            )

    @classmethod
    def from_timm(cls, vision_model_name: str, image_size: int) -> "CNNGemmaImageProcessor":
        """Interpolation, mean and std from timm's pretrained config for the model (no download)."""
        cfg = timm.get_pretrained_cfg(vision_model_name)
        if cfg is None:
            return cls(size=image_size)
        return cls(
            size=image_size,
            resample=RESAMPLE.get(cfg.interpolation, PILImageResampling.BICUBIC),
            image_mean=list(cfg.mean),
            image_std=list(cfg.std),
        )

    def preprocess(self, images, **kwargs):
        """One image or a list of images -> `pixel_values` of shape (B, 3, height, width), a torch tensor unless
        `return_tensors` says otherwise."""
        self.check_kwargs(kwargs)
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if not images:
            raise ValueError("Expected at least one image, got an empty list.")
        for i, image in enumerate(images):
            if not isinstance(image, (Image.Image, np.ndarray, torch.Tensor)):
                raise TypeError(
                    f"Expected a PIL image or a uint8 numpy array (H, W[, C]), got {type(image).__name__}. "
                    "Open files with processor.image_processor.load_image(path)."
                )
            is_pil = isinstance(image, Image.Image)
            if 0 in (image.size if is_pil else image.shape):
                size = (
                    f"{image.width}x{image.height} pixels (width x height)"
                    if is_pil
                    else f"shape {tuple(image.shape)}"
                )
                raise ValueError(f"images[{i}] is empty: {size}. Every image needs at least 1x1 pixel.")
        kwargs.setdefault("return_tensors", "pt")
        return super().preprocess(images, **kwargs)

    def process_image(self, image, do_convert_rgb: bool | None = None, **kwargs) -> np.ndarray:
        if do_convert_rgb and isinstance(image, Image.Image):
            image = to_rgb(image)  # before the backend's own conversion, which clips 16-bit and blends alpha on white
        return super().process_image(image, do_convert_rgb=do_convert_rgb, **kwargs)


__all__ = ["PIXEL_LIMIT", "CNNGemmaImageProcessor", "NoValidPixelsError", "load_image"]
