"""Image decoding and processing for CNNGemma: any file or PIL mode -> upright 8-bit RGB -> square resize -> normalise.

`load_image` decodes a file as CNNGemma's training data were decoded, so a file gives the same pixels in training and
captioning. Aerial captions talk about corners and edges, so the whole image is kept: it is resized, never cropped.
"""

import io
import os

import numpy as np
import timm
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
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


def stretch(array: np.ndarray) -> np.ndarray:
    """Maps high-bit-depth bands to uint8 with a per-band 2-98 percentile stretch (usual for remote sensing)."""
    array = array.astype(np.float32)
    if array.ndim == 2:
        array = array[:, :, None]
    low = np.percentile(array, 2, axis=(0, 1))
    high = np.percentile(array, 98, axis=(0, 1))
    scaled = (array - low) / np.maximum(high - low, 1e-6)
    return (np.clip(scaled, 0, 1) * 255 + 0.5).astype(np.uint8)


def bands_to_rgb(array: np.ndarray, bands: tuple[int, int, int] = (0, 1, 2)) -> Image.Image:
    """An (H, W), (H, W, C) or planar (C, H, W) array of any dtype -> RGB. Non-uint8 data is stretched per band;
    `bands` are shown as R, G, B (default the first three); one or two bands give grey (the first band repeated)."""
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
    if array.dtype != np.uint8:
        array = stretch(array)
    return Image.fromarray(np.ascontiguousarray(array), "RGB")


def needs_tifffile(image: Image.Image) -> bool:
    """Pillow reads a 16-bit RGB TIFF as its high bytes and a multi-band one as its first band: use tifffile."""
    bits = image.tag_v2.get(258, (8,))
    bands = image.tag_v2.get(277, 1)
    return max(bits if isinstance(bits, tuple) else (bits,)) > 8 and bands > 1 or bands > 4


def decode_tiff(
    file, orientation: int | None = None, bands: tuple[int, int, int] = (0, 1, 2)
) -> tuple[Image.Image, str]:
    """A TIFF (a binary file object) read with tifffile -> (upright RGB image, e.g. "TIFF uint16 4x48x64")."""
    try:
        import tifffile  # only these TIFFs need it, so a Hub user without it can still caption everything else
    except ImportError as error:
        raise ImportError(
            "This TIFF has more bands or bits per band than Pillow reads; reading it needs tifffile: "
            "pip install tifffile"
        ) from error
    array = tifffile.imread(file)
    image = bands_to_rgb(array, bands)
    if orientation in UPRIGHT:
        image = image.transpose(UPRIGHT[orientation])
    return image, f"TIFF {array.dtype} {'x'.join(map(str, array.shape))}"


def to_rgb(image: Image.Image) -> Image.Image:
    """A PIL image in any mode -> upright 8-bit RGB by `load_image`'s rules, for images the caller opened.
    (The processor calls it; a TIFF that Pillow misreads is refused: open it with `load_image` instead.)"""
    if hasattr(image, "tag_v2") and needs_tifffile(image):
        raise ValueError(
            f"This TIFF ({image.tag_v2.get(277, 1)} bands, bits per band {image.tag_v2.get(258)}) is one that Pillow "
            "reads wrongly (only the high bytes, or only the first band). Open it with "
            "processor.image_processor.load_image(path) instead of PIL.Image.open: it reads such TIFFs with tifffile."
        )
    image = ImageOps.exif_transpose(image)  # as `datasets` does when it decodes a training image
    if image.mode in HIGH_DEPTH_MODES:  # PIL's convert would clip at 255
        return bands_to_rgb(np.asarray(image))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # Pillow warns when such a palette goes straight to RGB; same colours
    elif image.mode == "La":
        image = image.convert("LA")  # Pillow has no La -> RGB conversion
    # L, LA, P, PA, RGBA, CMYK, YCbCr, 1, ...: PIL knows the way; alpha is dropped, keeping the pixels under it
    image = image if image.mode == "RGB" else image.convert("RGB")  # a copy either way: exif_transpose made one
    image.info.pop("transparency", None)  # a transparent colour (PNG tRNS): transformers would paint it white
    return image


def load_image(source, bands: tuple[int, int, int] = (0, 1, 2)) -> Image.Image:
    """Opens an image file as upright 8-bit RGB, as the training data were decoded: same file, same pixels.

    - EXIF orientation is applied, as `datasets` applies it when it decodes an image.
    - 8-bit modes convert as Pillow converts them; alpha is dropped, keeping the pixels under it.
    - 16-bit, 32-bit and float data get a per-band 2-98 percentile stretch to 0-255 (usual for remote sensing).
    - Bands 1-3 are taken as R, G, B and further bands (e.g. near infrared) are dropped; one or two bands give grey.
      `bands` picks others for TIFFs read with tifffile, e.g. (2, 1, 0) for blue-green-red-NIR files; use the same
      value when building the dataset.
    - TIFFs that Pillow cannot read (16-bit colour, more than 4 bands, planar, ...) are read with `tifffile`.

    Args:
        source: a path, the file's bytes or a binary file object.
    """
    name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else None
    if name is not None:
        with open(name, "rb") as file:
            data = file.read()
    else:
        data = bytes(source) if isinstance(source, (bytes, bytearray, memoryview)) else source.read()
    # Decoded from the bytes, as the training data were: Pillow memory-maps an uncompressed file opened by path, and
    # then skips a TIFF's orientation.
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "TIFF" or not needs_tifffile(image):
                image.load()  # decodes now, so that a truncated file fails here
                return to_rgb(image)
            orientation = image.getexif().get(ExifTags.Base.Orientation)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        if data[:4] not in TIFF_SIGNATURES:
            if name is not None and isinstance(error, UnidentifiedImageError):  # Pillow would name the BytesIO
                raise UnidentifiedImageError(f"cannot identify image file {name!r}") from None
            raise
        orientation = None  # Pillow cannot read this TIFF at all: tifffile may
    return decode_tiff(io.BytesIO(data), orientation, bands)[0]


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
        if isinstance(kwargs.get("resample"), str):  # a name: PilBackend would quietly resize bilinear instead
            if kwargs["resample"] not in RESAMPLE:
                raise ValueError(
                    f"resample={kwargs['resample']!r} is not supported; expected one of {tuple(RESAMPLE)}."
                )
            kwargs["resample"] = RESAMPLE[kwargs["resample"]]
        super().__init__(**kwargs)

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
        if unknown := sorted(set(kwargs) - set(self.valid_kwargs.__annotations__)):
            raise ValueError(
                f"CNNGemmaImageProcessor got unknown keyword argument(s) {unknown}; expected transformers' image "
                f"kwargs: {', '.join(sorted(self.valid_kwargs.__annotations__))}."
            )
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


__all__ = ["CNNGemmaImageProcessor", "load_image"]
