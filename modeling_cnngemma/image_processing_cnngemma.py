"""Image processor for CNNGemma: any PIL mode -> RGB -> square resize (no centre crop) -> ImageNet normalisation.

Aerial captions talk about corners and edges, so the whole image is kept: it is resized, never cropped.
"""

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
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
    # L, LA, P, PA, RGBA, CMYK, YCbCr, 1: PIL knows the way; alpha is dropped, keeping the pixels under it
    return image.convert("RGB")


class CNNGemmaImageProcessor(BaseImageProcessor):
    r"""
    Prepares images for CNNGemma's CNN. The defaults are the timm model's pretrained config (see `from_timm`).

    Args:
        size (`int`): the square side the image is resized to (the config's `image_size`).
        resample (`str`): interpolation, one of "nearest", "bilinear", "bicubic", "lanczos".
        image_mean (`list[float]`), image_std (`list[float]`): per-channel normalisation after scaling to [0, 1].
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        size: int = 224,
        resample: str = "bicubic",
        image_mean: list[float] | tuple[float, ...] = (0.485, 0.456, 0.406),
        image_std: list[float] | tuple[float, ...] = (0.229, 0.224, 0.225),
        **kwargs,
    ):
        super().__init__(**kwargs)
        if resample not in RESAMPLE:
            raise ValueError(f"resample={resample!r} is not supported; expected one of {tuple(RESAMPLE)}.")
        self.size = int(size)
        self.resample = resample
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]

    @classmethod
    def from_timm(cls, vision_model_name: str, image_size: int) -> "CNNGemmaImageProcessor":
        """Reads interpolation, mean and std from timm's pretrained config for the model (no download)."""
        import timm

        cfg = timm.get_pretrained_cfg(vision_model_name)
        if cfg is None:
            return cls(size=image_size)
        resample = cfg.interpolation if cfg.interpolation in RESAMPLE else "bicubic"
        return cls(size=image_size, resample=resample, image_mean=list(cfg.mean), image_std=list(cfg.std))

    def _to_array(self, image) -> np.ndarray:
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        if not isinstance(image, Image.Image):
            raise TypeError(
                f"Expected a PIL image or a uint8 numpy array (H, W[, C]), got {type(image).__name__}. "
                "Open files with PIL.Image.open(path)."
            )
        image = to_rgb(image).resize((self.size, self.size), RESAMPLE[self.resample])
        array = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
        array = (array - np.asarray(self.image_mean, dtype=np.float32)) / np.asarray(self.image_std, dtype=np.float32)
        return array.transpose(2, 0, 1)  # (H, W, C) -> (C, H, W)

    def preprocess(self, images, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        """One image or a list of images -> `pixel_values` of shape (B, 3, size, size)."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        if len(images) == 0:
            raise ValueError("Expected at least one image, got an empty list.")
        pixel_values = np.stack([self._to_array(image) for image in images])
        if return_tensors == "pt":
            pixel_values = torch.from_numpy(pixel_values)
        return BatchFeature(data={"pixel_values": pixel_values})

    def __call__(self, images, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        return self.preprocess(images, return_tensors=return_tensors, **kwargs)


__all__ = ["CNNGemmaImageProcessor"]
