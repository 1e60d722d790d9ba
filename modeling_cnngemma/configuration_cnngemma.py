"""CNNGemma configuration: a timm CNN encoder, a projector and a Gemma-family decoder.

The encoder's output grid, and so the number of image tokens, is measured on the meta device, not assumed.
"""

import difflib
from functools import lru_cache

import timm
import torch
from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec

TOKEN_MODES = ("single", "multi", "grid")
PROJECTOR_TYPES = ("linear", "mlp")
TEXT_MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")

# Fields with a plain type, checked by name (a bool is not taken for a number).
SCALAR_FIELDS = (
    ("prompt_prefix", (str,), "a str (the default prompt, e.g. 'caption en')"),
    ("image_token_id", (int,), "an int (the id of `<image>` in the tokenizer)"),
    ("initializer_range", (int, float), "a number (the std of the projector's initial weights)"),
    ("tie_word_embeddings", (bool,), "a bool"),
)

# PaliGemma-3B's decoder: Gemma 2B with PaliGemma's 257,216-token vocabulary (257,152 + 64 special tokens).
PALIGEMMA_VOCAB_SIZE = 257216
PALIGEMMA_IMAGE_TOKEN_ID = 257152


@lru_cache(maxsize=64)
def probe_vision_tower(vision_model_name: str, image_size: int) -> tuple[int, int, int]:
    """(feature_dim, grid_height, grid_width) of the timm model's final feature map, from a meta-device forward:
    no weights are allocated and nothing is downloaded."""
    with torch.device("meta"):
        # eval(): a train-mode BatchNorm refuses a 1x1 map at batch 1 (image_size == total stride)
        model = timm.create_model(vision_model_name, pretrained=False, num_classes=0).eval()
        reduction = model.feature_info[-1]["reduction"] if getattr(model, "feature_info", None) else 32
        if image_size < reduction:
            raise ValueError(
                f"image_size={image_size} is too small for {vision_model_name!r}, whose final feature map is "
                f"{reduction}x smaller than its input; expected image_size >= {reduction}."
            )
        try:
            features = model.forward_features(torch.empty(1, 3, image_size, image_size))
        except (AssertionError, RuntimeError) as error:  # e.g. a ViT built for 224 px refuses other sizes
            raise ValueError(
                f"vision_model_name={vision_model_name!r} cannot encode {image_size} px images ({error}). Use a "
                "convolutional timm model such as 'mobilenetv3_large_100' or 'efficientnet_b0'."
            ) from None
    if features.ndim != 4:
        raise ValueError(
            f"vision_model_name={vision_model_name!r} is not a CNN: its forward_features returns a tensor of shape "
            f"{tuple(features.shape)}, expected (B, C, H, W). Use a convolutional timm model such as "
            "'mobilenetv3_large_100' or 'efficientnet_b0'."
        )
    _, channels, height, width = features.shape
    return channels, height, width


class CNNGemmaConfig(PreTrainedConfig):
    r"""
    Configuration of a CNNGemma model: PaliGemma's layout with its SigLIP tower replaced by a timm CNN.

    Args:
        vision_model_name (`str`): timm architecture of the encoder, e.g. `"mobilenetv3_large_100"`.
        image_size (`int`): square input size in pixels.
        token_mode (`str`): `"single"` feeds the globally pooled final feature map as 1 image token, `"multi"` feeds
            every position of the final map (H*W tokens, 49 at 224 px for the stride-32 encoders), `"grid"` pools
            the map to `token_grid` x `token_grid` cells (adaptive average pooling) and feeds one token per cell.
        token_grid (`int`, *optional*): the side k of the grid in `"grid"` mode, 1 <= k <= the map's side.
        text_config (`dict` or `PreTrainedConfig`): a Gemma-family causal LM config (`gemma`, `gemma2`,
            `gemma3_text`). Defaults to the Gemma-2B shape used by PaliGemma-3B. Pad, bos and eos ids live here.
        projector_type (`str`): `"linear"` (one Linear) or `"mlp"` (Linear-GELU-Linear).
        image_token_id (`int`): id of the `<image>` placeholder token.
        prompt_prefix (`str`): the default prompt the processor puts before the caption.
        vision_channels_last (`bool`): feed the CNN channels_last (NHWC) images, which oneDNN and cuDNN convolve
            natively. Same outputs up to float rounding; False keeps the plain NCHW layout.
        image_mean, image_std (`list[float]`, *optional*): the normalisation the CNN's weights were trained with, for
            the processor; None takes timm's pretrained config for `vision_model_name` (EfficientNet-Lite0's ImageNet
            weights expect 0.5 and 0.5, which timm does not say).
        provenance (`dict`, *optional*): where the pretrained parts came from (`language_model`, `vision_tower`:
            a package and file hash, or a Hub id), recorded by the builder for cards and later fine-tunes.

    Derived on every load, never read from kwargs: `vision_feature_dim`, `vision_grid`, `num_image_tokens`.
    """

    model_type = "cnngemma"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="gemma",
            init_kwargs={
                "hidden_size": 2048,
                "num_hidden_layers": 18,
                "intermediate_size": 16384,
                "num_attention_heads": 8,
                "num_key_value_heads": 1,
                "head_dim": 256,
                "vocab_size": PALIGEMMA_VOCAB_SIZE,
                "pad_token_id": 0,
                "eos_token_id": 1,
                "bos_token_id": 2,
            },
        ),
    }

    vision_model_name: str = "mobilenetv3_large_100"
    image_size: int = 224
    token_mode: str = "single"
    token_grid: int | None = None
    text_config: dict | PreTrainedConfig | None = None
    projector_type: str = "linear"
    image_token_id: int = PALIGEMMA_IMAGE_TOKEN_ID
    prompt_prefix: str = "caption en"
    vision_channels_last: bool = True
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    provenance: dict | None = None
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        for derived in ("vision_feature_dim", "vision_grid", "num_image_tokens"):
            kwargs.pop(derived, None)  # written to config.json for readers, recomputed here
        if not isinstance(self.text_config, dict | PreTrainedConfig | None):
            raise TypeError(
                f"text_config is a {type(self.text_config).__name__} ({str(self.text_config)[:60]}); expected an object "
                'of decoder settings such as {"model_type": "gemma", "hidden_size": 2048, ...}, or none for the default.'
            )
        super().__post_init__(**kwargs)
        self.validate_architecture()
        self.vision_feature_dim, height, width = probe_vision_tower(self.vision_model_name, self.image_size)
        self.vision_grid = [height, width]
        if self.token_mode == "grid" and self.token_grid > min(height, width):
            raise ValueError(
                f"token_grid={self.token_grid} is larger than the {height}x{width} final feature map of "
                f"{self.vision_model_name!r} at image_size={self.image_size}; expected 1 <= token_grid <= "
                f"{min(height, width)}, or token_mode='multi' for every position."
            )
        tokens = {"single": 1, "multi": height * width, "grid": (self.token_grid or 0) ** 2}
        self.num_image_tokens = tokens[self.token_mode]

    def validate_architecture(self):
        """Raises a ValueError naming the field, the value and what is allowed (transformers' hook name)."""
        for name, allowed in (("token_mode", TOKEN_MODES), ("projector_type", PROJECTOR_TYPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported; expected one of {allowed}.")
        if self.token_mode == "grid" and (
            not isinstance(self.token_grid, int) or isinstance(self.token_grid, bool) or self.token_grid < 1
        ):
            raise ValueError(
                f"token_grid={self.token_grid!r} must be a positive int with token_mode='grid': the side k of the "
                "k x k grid of pooled image tokens."
            )
        if self.token_mode != "grid" and self.token_grid is not None:
            raise ValueError(
                f"token_grid={self.token_grid!r} is only read with token_mode='grid', not {self.token_mode!r}. Set "
                "token_mode='grid' or leave token_grid out."
            )
        if self.text_config.model_type not in TEXT_MODEL_TYPES:
            raise ValueError(
                f"text_config.model_type={self.text_config.model_type!r} is not supported; expected a Gemma-family "
                f"causal LM, one of {TEXT_MODEL_TYPES}."
            )
        if not isinstance(self.vision_model_name, str) or not timm.is_model(self.vision_model_name):
            close = difflib.get_close_matches(str(self.vision_model_name), timm.list_models(), n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(
                f"vision_model_name={self.vision_model_name!r} is not a timm architecture.{hint} "
                "See timm.list_models() for the names timm knows."
            )
        if not isinstance(self.vision_channels_last, bool):
            raise ValueError(
                f"vision_channels_last={self.vision_channels_last!r} must be a bool (True: NHWC fast path, False: NCHW)."
            )
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, (list, tuple))
                or len(value) != 3
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
                or (name == "image_std" and min(value) <= 0)
            ):
                raise ValueError(
                    f"{name}={value!r} must be None or three numbers (R, G, B){', each > 0' if name == 'image_std' else ''}."
                )
        if (self.image_mean is None) != (self.image_std is None):
            raise ValueError(
                f"image_mean={self.image_mean!r} and image_std={self.image_std!r}: set both (the normalisation the "
                "CNN's weights expect) or neither (timm's pretrained config)."
            )
        if self.provenance is not None and not isinstance(self.provenance, dict):
            raise ValueError(f"provenance={self.provenance!r} must be None or a dict of where each part came from.")
        for name, kind, expected in SCALAR_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, kind) or (bool not in kind and isinstance(value, bool)):
                raise ValueError(f"{name}={value!r} must be {expected}.")
        if not isinstance(self.image_size, int) or isinstance(self.image_size, bool) or self.image_size <= 0:
            raise ValueError(f"image_size={self.image_size!r} must be a positive int (pixels of the square input).")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            value = getattr(self.text_config, name, None)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"text_config.{name}={value!r} must be a positive int (a size of the decoder).")
        vocab_size = self.text_config.vocab_size
        if not 0 <= self.image_token_id < vocab_size:
            raise ValueError(
                f"image_token_id={self.image_token_id} is outside the text model's vocabulary (vocab_size="
                f"{vocab_size}); expected 0 <= image_token_id < {vocab_size}. Add `<image>` to the tokenizer and "
                "set both from it."
            )
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if getattr(self.text_config, name, None) == self.image_token_id:
                raise ValueError(
                    f"image_token_id={self.image_token_id} equals text_config.{name}; the `<image>` placeholder "
                    "needs its own id."
                )


__all__ = ["CNNGemmaConfig"]
