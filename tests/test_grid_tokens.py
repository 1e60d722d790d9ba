"""`token_mode="grid"`: k x k pooled image tokens. Counts measured from the encoder, bad sizes refused, processor and
model agree, and a saved grid model reloads and generates identically."""

import json

import pytest
import torch
from conftest import REPO_ROOT, make_tiny_model, random_images, synthetic_captions

from modeling_cnngemma import CNNGemmaConfig, CNNGemmaForConditionalGeneration, CNNGemmaProcessor

TINY_TEXT = json.loads((REPO_ROOT / "configuration" / "tiny.json").read_text())["text_config"]


def grid_config(tiny_config, k):
    return CNNGemmaConfig.from_dict({**tiny_config.to_dict(), "token_mode": "grid", "token_grid": k})


@pytest.mark.parametrize("encoder,image_size,k", [("efficientnet_b0", 224, 1), ("efficientnet_b0", 224, 3)])
def test_grid_token_count_is_k_squared(encoder, image_size, k):
    config = CNNGemmaConfig(
        vision_model_name=encoder,
        image_size=image_size,
        token_mode="grid",
        token_grid=k,
        text_config=TINY_TEXT,
        image_token_id=4,
    )
    assert (config.num_image_tokens, config.vision_grid) == (k * k, [7, 7])


@pytest.mark.parametrize(
    "fields,message",
    [
        (
            {"token_grid": 5},
            "token_grid=5 is larger than the 4x4 final feature map of 'mobilenetv3_small_050' at image_size=128; "
            "expected 1 <= token_grid <= 4, or token_mode='multi' for every position.",
        ),
        *[
            (
                {"token_grid": bad},
                f"token_grid={bad!r} must be a positive int with token_mode='grid': the side k of the k x k grid of "
                "pooled image tokens.",
            )
            for bad in (0, -2, 2.5, "2", True, None)
        ],
        (
            {"token_mode": "multi", "token_grid": 2},
            "token_grid=2 is only read with token_mode='grid', not 'multi'. Set token_mode='grid' or leave "
            "token_grid out.",
        ),
    ],
)
def test_bad_grid_sizes_are_refused(tiny_config, fields, message):
    with pytest.raises(ValueError) as error:
        CNNGemmaConfig.from_dict({**tiny_config.to_dict(), "token_mode": "grid", **fields})
    assert str(error.value) == message


def test_grid_features_are_the_pooled_map_and_its_ends_are_single_and_multi(tiny_config):
    model = make_tiny_model(grid_config(tiny_config, 2))
    pixel_values = torch.randn(3, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feature_map = model.model.vision_tower.forward_features(pixel_values)  # (3, 288, 4, 4)
        cells = feature_map.unflatten(2, (2, 2)).unflatten(4, (2, 2)).mean(dim=(3, 5))  # 2x2 cells of 2x2
        expected = model.multi_modal_projector(cells.flatten(2).transpose(1, 2))
        torch.testing.assert_close(model.get_image_features(pixel_values), expected)
        for k, mode in ((1, "single"), (4, "multi")):
            model.config.token_mode, model.config.token_grid = "grid", k
            grid = model.get_image_features(pixel_values)
            model.config.token_mode, model.config.token_grid = mode, None
            torch.testing.assert_close(grid, model.get_image_features(pixel_values))


def test_processor_and_model_agree_and_a_saved_grid_model_generates_identically(tiny_config, tokenizer, tmp_path):
    config = grid_config(tiny_config, 3)
    model = make_tiny_model(config)
    processor = CNNGemmaProcessor.from_model_config(config, tokenizer)
    inputs = processor(images=random_images(2), suffix=synthetic_captions(2))
    assert (inputs["input_ids"] == config.image_token_id).sum(dim=1).tolist() == [9, 9]
    with torch.no_grad():
        out = model(**inputs)
    assert out.image_hidden_states.shape == (2, 9, 128) and torch.isfinite(out.loss)

    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = CNNGemmaForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert (reloaded.config.token_mode, reloaded.config.token_grid, reloaded.config.num_image_tokens) == ("grid", 3, 9)
    reloaded_processor = CNNGemmaProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    prompts = reloaded_processor(images=random_images(2, seed=3))
    assert torch.equal(prompts["input_ids"], processor(images=random_images(2, seed=3))["input_ids"])
    assert torch.equal(
        reloaded.generate(**prompts, max_new_tokens=8, do_sample=False),
        model.generate(**prompts, max_new_tokens=8, do_sample=False),
    )
