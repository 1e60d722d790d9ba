"""Image processor for CNNGemma on transformers' `PilBackend`: any PIL mode -> RGB -> square resize -> normalise.

Aerial captions talk about corners and edges, so the whole image is kept: it is resized, never cropped.
"""

import numpy as np
import timm
import torch
from PIL import Image
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

RESAMPLE = {
    "nearest": PILImageResampling.NEAREST,
    "bilinear": PILImageResampling.BILINEAR,
    "bicubic": PILImageResampling.BICUBIC,
    "lanczos": PILImageResampling.LANCZOS,
}


def to_rgb(image: Image.Image) -> Image.Image:
    """Converts any PIL mode to 8-bit RGB. 16-bit and 32-bit grey images are scaled by their range, not clipped."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":  # I;16, I;16B, I (32-bit), F: PIL's convert would clip at 255
        array = np.asarray(image, dtype=np.float64)
        full_scale = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        array = np.clip(array / full_scale * 255.0 + 0.5, 0, 255).astype(np.uint8)
        image = Image.fromarray(array)  # uint8 (H, W) -> mode L
    # L, LA, P, PA, RGBA, CMYK, YCbCr, 1: PIL knows the way; alpha is dropped, keeping the pixels under it, as
    # dataset_builder does when it stores an image
    return image.convert("RGB")


class CNNGemmaImageProcessor(PilBackend):
    r"""
    Prepares images for CNNGemma's CNN with transformers' `PilBackend` (PIL resize, NumPy rescale and normalise).
    It is the one backend for training and captioning, so the same file gives the same pixels in both.

    Takes transformers' standard image kwargs (`size`, `do_resize`, `resample`, `do_normalize`, `image_mean`,
    `image_std`, ...) at construction or per call; any other kwarg raises. Defaults: the timm model's pretrained
    config (see `from_timm`), without its centre crop.
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
        for image in images:
            if not isinstance(image, (Image.Image, np.ndarray, torch.Tensor)):
                raise TypeError(
                    f"Expected a PIL image or a uint8 numpy array (H, W[, C]), got {type(image).__name__}. "
                    "Open files with PIL.Image.open(path)."
                )
        kwargs.setdefault("return_tensors", "pt")
        return super().preprocess(images, **kwargs)

    def process_image(self, image, do_convert_rgb: bool | None = None, **kwargs) -> np.ndarray:
        if do_convert_rgb and isinstance(image, Image.Image):
            image = to_rgb(image)  # before the backend's own conversion, which clips 16-bit and blends alpha on white
        return super().process_image(image, do_convert_rgb=do_convert_rgb, **kwargs)


__all__ = ["CNNGemmaImageProcessor"]
