"""CNNGemmaConfig: derived token counts from the real encoder grid, validation messages, shipped JSON files."""

import importlib.util
import json

import pytest
import torch
from conftest import REPO_ROOT

from modeling_cnngemma import CNNGemmaConfig, CNNGemmaForConditionalGeneration, CNNGemmaProcessor

TINY_TEXT = json.loads((REPO_ROOT / "configuration" / "tiny.json").read_text())["text_config"]

# (file, encoder, tokens per image, feature dim): the report's four variants, their Gemma 3 270M twins and the
# tiny test config
SHIPPED = [
    ("mobilenet_single", "mobilenetv3_large_100", 1, 960),
    ("mobilenet_multi", "mobilenetv3_large_100", 49, 960),
    ("efficientnet_single", "efficientnet_b0", 1, 1280),
    ("efficientnet_multi", "efficientnet_b0", 49, 1280),
    ("mobilenet_single_270m", "mobilenetv3_large_100", 1, 960),
    ("mobilenet_multi_270m", "mobilenetv3_large_100", 49, 960),
    ("efficientnet_single_270m", "efficientnet_b0", 1, 1280),
    ("efficientnet_multi_270m", "efficientnet_b0", 49, 1280),
    ("lite0_single_270m", "efficientnet_lite0", 1, 1280),
    ("lite0_grid3_270m", "efficientnet_lite0", 9, 1280),
    ("lite0_multi_270m", "efficientnet_lite0", 49, 1280),
    ("tiny", "mobilenetv3_small_050", 16, 288),
]


@pytest.mark.parametrize("name,encoder,num_tokens,feature_dim", SHIPPED)
def test_shipped_configs_give_real_feature_shapes(name, encoder, num_tokens, feature_dim):
    config = CNNGemmaConfig.from_json_file(REPO_ROOT / "configuration" / f"{name}.json")
    assert (config.vision_model_name, config.num_image_tokens, config.vision_feature_dim) == (
        encoder,
        num_tokens,
        feature_dim,
    )
    # Build the real encoder + projector with the tiny decoder swapped in (the 2B LM is not needed for shapes).
    config.text_config = type(config.text_config)(**TINY_TEXT)
    model = CNNGemmaForConditionalGeneration(config).eval()
    pixel_values = torch.randn(2, 3, config.image_size, config.image_size)
    with torch.no_grad():
        feature_map = model.model.vision_tower.forward_features(pixel_values)
        features = model.get_image_features(pixel_values)
    assert feature_map.shape[1] == feature_dim
    assert features.shape == (2, num_tokens, TINY_TEXT["hidden_size"])
    if config.token_mode == "multi":
        assert num_tokens == feature_map.shape[2] * feature_map.shape[3]


@pytest.mark.parametrize(
    "encoder,image_size,expected_tokens",
    [
        ("resnet18", 256, 64),
        ("convnext_atto", 160, 25),
        ("mobilenetv3_large_100", 320, 100),
        ("mobilenetv3_large_100", 32, 1),
    ],
)
def test_num_image_tokens_follows_other_cnns_and_sizes(encoder, image_size, expected_tokens):
    config = CNNGemmaConfig(
        vision_model_name=encoder, image_size=image_size, token_mode="multi", text_config=TINY_TEXT, image_token_id=4
    )
    assert config.num_image_tokens == expected_tokens == config.vision_grid[0] * config.vision_grid[1]
    assert CNNGemmaConfig(vision_model_name=encoder, text_config=TINY_TEXT, image_token_id=4).num_image_tokens == 1


def test_default_text_config_is_paligemma_gemma_2b():
    text = CNNGemmaConfig().text_config
    assert (text.model_type, text.hidden_size, text.num_hidden_layers, text.intermediate_size) == (
        "gemma",
        2048,
        18,
        16384,
    )
    assert (text.num_attention_heads, text.num_key_value_heads, text.head_dim, text.vocab_size) == (8, 1, 256, 257216)
    assert CNNGemmaConfig().image_token_id == 257152


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            {"token_mode": "pooled"},
            "token_mode='pooled' is not supported; expected one of ('single', 'multi', 'grid').",
        ),
        (
            {"projector_type": "qformer"},
            "projector_type='qformer' is not supported; expected one of ('linear', 'mlp').",
        ),
        (
            {"vision_model_name": "mobilenetv3_larg_100"},
            "vision_model_name='mobilenetv3_larg_100' is not a timm architecture. Did you mean "
            "'mobilenetv3_large_100', 'tf_mobilenetv3_large_100', 'mobilenetv3_large_150d'? "
            "See timm.list_models() for the names timm knows.",
        ),
        (
            {"image_size": 16},
            "image_size=16 is too small for 'mobilenetv3_large_100', whose final feature map is 32x smaller than "
            "its input; expected image_size >= 32.",
        ),
        ({"image_size": "224"}, "image_size='224' must be a positive int (pixels of the square input)."),
        (
            {"text_config": {"model_type": "llama"}},
            "text_config.model_type='llama' is not supported; expected a Gemma-family causal LM, one of "
            "('gemma', 'gemma2', 'gemma3_text').",
        ),
        (
            {"image_token_id": 300000},
            "image_token_id=300000 is outside the text model's vocabulary (vocab_size=257216); expected "
            "0 <= image_token_id < 257216. Add `<image>` to the tokenizer and set both from it.",
        ),
        (
            {"image_token_id": 1},
            "image_token_id=1 equals text_config.eos_token_id; the `<image>` placeholder needs its own id.",
        ),
        ({"prompt_prefix": 5}, "prompt_prefix=5 must be a str (the default prompt, e.g. 'caption en')."),
        (
            {"image_token_id": "257152"},
            "image_token_id='257152' must be an int (the id of `<image>` in the tokenizer).",
        ),
        (
            {"initializer_range": True},
            "initializer_range=True must be a number (the std of the projector's initial weights).",
        ),
        ({"tie_word_embeddings": 1}, "tie_word_embeddings=1 must be a bool."),
        (
            {"vision_model_name": "vit_tiny_patch16_224"},
            "vision_model_name='vit_tiny_patch16_224' is not a CNN: its forward_features returns a tensor of shape "
            "(1, 197, 192), expected (B, C, H, W). Use a convolutional timm model such as 'mobilenetv3_large_100' "
            "or 'efficientnet_b0'.",
        ),
    ],
)
def test_bad_values_raise_with_field_value_and_allowed(kwargs, message):
    with pytest.raises(ValueError) as error:
        CNNGemmaConfig(**kwargs)
    assert str(error.value) == message


def test_config_round_trips_and_recomputes_derived_fields(tmp_path):
    config = CNNGemmaConfig(
        vision_model_name="efficientnet_b0", token_mode="multi", text_config=TINY_TEXT, image_token_id=4
    )
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["num_image_tokens"] = 7  # a hand-edited derived value is ignored: the encoder decides
    (tmp_path / "config.json").write_text(json.dumps(saved))
    reloaded = CNNGemmaConfig.from_pretrained(tmp_path)
    assert reloaded.num_image_tokens == 49
    assert reloaded.text_config.to_dict() == config.text_config.to_dict()


def test_configuration_files_are_up_to_date():
    spec = importlib.util.spec_from_file_location("make_configs", REPO_ROOT / "scripts" / "make_configs.py")
    make_configs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_configs)
    configs = make_configs.build_configs()
    assert sorted(configs) == sorted(name for name, *_ in SHIPPED)
    assert make_configs.stale_files(configs) == [], "run: python scripts/make_configs.py"


def test_lite0_configs_carry_the_normalisation_their_weights_expect(tokenizer):
    """EfficientNet-Lite0's ImageNet weights were trained on [-1, 1] inputs; timm's config says ImageNet mean/std."""
    config = CNNGemmaConfig.from_json_file(REPO_ROOT / "configuration" / "lite0_grid3_270m.json")
    assert (config.image_mean, config.image_std) == ([0.5] * 3, [0.5] * 3)
    config.text_config.vocab_size = len(tokenizer)
    config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    image_processor = CNNGemmaProcessor.from_model_config(config, tokenizer).image_processor
    assert (list(image_processor.image_mean), list(image_processor.image_std)) == ([0.5] * 3, [0.5] * 3)
    with pytest.raises(ValueError) as error:
        CNNGemmaConfig.from_dict({**config.to_dict(), "image_std": None})
    assert str(error.value) == (
        "image_mean=[0.5, 0.5, 0.5] and image_std=None: set both (the normalisation the CNN's weights expect) or "
        "neither (timm's pretrained config)."
    )
