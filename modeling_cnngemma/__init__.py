"""CNNGemma: PaliGemma's layout with a small timm CNN as the vision tower, for cheap aerial-image captioning."""

from .configuration_cnngemma import CNNGemmaConfig
from .image_processing_cnngemma import CNNGemmaImageProcessor, load_image
from .modeling_cnngemma import (
    CNNGemmaForConditionalGeneration,
    CNNGemmaModel,
    CNNGemmaMultiModalProjector,
    CNNGemmaPreTrainedModel,
    check_source,
)
from .processing_cnngemma import CNNGemmaProcessor
from .tokenizer import build_caption_tokenizer

# `save_pretrained` writes these auto_map entries, pointing at the module files it copies next to the weights.
CNNGemmaConfig.register_for_auto_class()
CNNGemmaModel.register_for_auto_class("AutoModel")
CNNGemmaForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
CNNGemmaImageProcessor.register_for_auto_class("AutoImageProcessor")
CNNGemmaProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "CNNGemmaConfig",
    "CNNGemmaForConditionalGeneration",
    "CNNGemmaImageProcessor",
    "CNNGemmaModel",
    "CNNGemmaMultiModalProjector",
    "CNNGemmaPreTrainedModel",
    "CNNGemmaProcessor",
    "build_caption_tokenizer",
    "check_source",
    "load_image",
]
