"""CNNGemmaProcessor, CNNGemmaImageProcessor and the caption tokenizer."""

import json

import numpy as np
import pytest
import torch
from conftest import random_images, synthetic_captions
from PIL import Image
from transformers import AutoTokenizer, GenerationConfig
from transformers.image_utils import PILImageResampling

from modeling_cnngemma import CNNGemmaImageProcessor, CNNGemmaProcessor, build_caption_tokenizer

MODES = ["1", "CMYK", "F", "HSV", "I", "I;16", "I;16B", "I;16L", "I;16N", "L", "LA", "La", "LAB", "P", "PA", "RGB"]
MODES += ["RGBA", "RGBa", "RGBX", "YCbCr"]


@pytest.mark.parametrize("mode", MODES)
def test_every_pil_mode_becomes_normalised_rgb(mode, processor):
    base = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    if mode == "I;16":
        image = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)  # uint16 -> I;16
    elif mode.startswith("I;16"):
        image = base.convert("L").convert(mode)
    else:
        image = base.convert(mode)
    assert image.mode == mode
    pixel_values = processor.image_processor(image)["pixel_values"]
    assert pixel_values.shape == (1, 3, 128, 128) and pixel_values.dtype == torch.float32
    assert torch.isfinite(pixel_values).all()


def test_sixteen_bit_is_stretched_2_to_98_percent_as_the_dataset_stores_it():
    # dataset_builder stores 16-bit images with this per-band stretch: dividing by 65535 instead would make 12-bit
    # sensor data (0..4095) nearly black at caption time
    image_processor = CNNGemmaImageProcessor(size=32, image_mean=[0, 0, 0], image_std=[1, 1, 1])
    grey = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 4  # 12-bit data, 0..4092
    pixel_values = image_processor(Image.fromarray(grey))["pixel_values"]
    low, high = np.percentile(grey.astype(np.float32), [2, 98])
    expected = (np.clip((grey - low) / (high - low), 0, 1) * 255 + 0.5).astype(np.uint8)
    torch.testing.assert_close(pixel_values, torch.from_numpy(expected / np.float32(255)).expand(1, 3, 32, 32))
    flat = image_processor(Image.fromarray(np.full((8, 8), 128 * 257, dtype=np.uint16)))["pixel_values"]
    assert flat.abs().max() == 0  # one value has no 2-98 range: black, as the builder stores it


def test_resize_keeps_the_whole_image_no_centre_crop():
    image_processor = CNNGemmaImageProcessor(size=64, resample="nearest", image_mean=[0, 0, 0], image_std=[1, 1, 1])
    array = np.zeros((100, 100, 3), dtype=np.uint8)
    array[:10, :10] = 255  # a white top-left corner, which a 0.875 centre crop would cut away
    pixel_values = image_processor(Image.fromarray(array))["pixel_values"][0]
    assert pixel_values[:, :6, :6].min() == 1.0 and pixel_values[:, 10:, 10:].max() == 0.0


def test_image_processor_follows_timm_pretrained_config():
    image_processor = CNNGemmaImageProcessor.from_timm("efficientnet_b0", 224)
    assert (image_processor.size.height, image_processor.size.width) == (224, 224)
    assert image_processor.resample == PILImageResampling.BICUBIC
    assert image_processor.image_mean == pytest.approx([0.485, 0.456, 0.406])


def test_size_do_resize_and_do_normalize_are_honoured(processor):
    image = random_images(1, size=40)[0]  # 40x40
    image_processor = processor.image_processor
    assert image_processor(image, size=64)["pixel_values"].shape == (1, 3, 64, 64)
    assert image_processor(image, size={"height": 32, "width": 48})["pixel_values"].shape == (1, 3, 32, 48)
    assert image_processor(image, do_resize=False)["pixel_values"].shape == (1, 3, 40, 40)
    raw = image_processor(image, do_resize=False, do_normalize=False)["pixel_values"][0]
    torch.testing.assert_close(raw, torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1))
    # and through the processor, which hands them to the image processor
    assert processor(images=[image], size=64)["pixel_values"].shape == (1, 3, 64, 64)


def test_unknown_kwargs_are_refused_by_name(processor):
    image = random_images(1)[0]
    with pytest.raises(ValueError, match=r"CNNGemmaImageProcessor got unknown keyword argument\(s\) \['sise'\]"):
        processor.image_processor(image, sise=64)
    with pytest.raises(ValueError, match=r"CNNGemmaProcessor got unknown keyword argument\(s\) \['prompt'\]"):
        processor(images=[image], prompt="caption en")
    with pytest.raises(ValueError, match=r"\['do_sample'\].*Generation options go to `generate`"):
        processor(images=[image], do_sample=False)  # what pipe(..., do_sample=False) would pass along
    with pytest.raises(ValueError, match=r"does not support \{'truncation': True\}"):
        processor(images=[image], truncation=True)
    # what transformers' pipelines pass is accepted: rows are left-padded to the longest anyway
    assert torch.equal(processor(images=[image], padding=True)["input_ids"], processor(images=[image])["input_ids"])


def test_the_constructor_refuses_unknown_kwargs_but_loads_saved_configs(tmp_path):
    with pytest.raises(
        ValueError, match=r"^CNNGemmaImageProcessor got unknown keyword argument\(s\) \['sizee'\]; expected"
    ):
        CNNGemmaImageProcessor(sizee=12)
    # the keys transformers writes beside the image kwargs, and a config saved by the first release (size as an int,
    # resample by name), both load
    written = CNNGemmaImageProcessor(size=64)
    written.save_pretrained(tmp_path / "now")
    assert CNNGemmaImageProcessor.from_pretrained(tmp_path / "now").to_dict() == written.to_dict()
    first_release = {
        "size": 96,
        "resample": "bilinear",
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "image_processor_type": "CNNGemmaImageProcessor",
        "processor_class": "CNNGemmaProcessor",
        "auto_map": {"AutoImageProcessor": "image_processing_cnngemma.CNNGemmaImageProcessor"},
    }
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "preprocessor_config.json").write_text(json.dumps(first_release))
    loaded = CNNGemmaImageProcessor.from_pretrained(tmp_path / "old")
    assert (loaded.size.height, loaded.size.width, loaded.resample) == (96, 96, PILImageResampling.BILINEAR)
    assert loaded(random_images(1, size=40)[0])["pixel_values"].shape == (1, 3, 96, 96)


def test_resample_by_name_and_unknown_names():
    assert CNNGemmaImageProcessor(resample="nearest").resample == PILImageResampling.NEAREST
    with pytest.raises(ValueError, match=r"resample='box' is not supported; expected one of \('nearest', "):
        CNNGemmaImageProcessor(resample="box")


def test_prompt_layout_labels_and_left_padding(processor, tokenizer):
    captions = ["two red planes", "one ship in the top left of the harbour"]
    batch = processor(images=random_images(2), suffix=captions)
    assert list(batch.keys()) == ["input_ids", "attention_mask", "labels", "pixel_values"]
    prompt_ids = tokenizer("caption en\n", add_special_tokens=False)["input_ids"]
    for row, caption in enumerate(captions):
        ids, mask, labels = (batch[k][row].tolist() for k in ("input_ids", "attention_mask", "labels"))
        start = mask.index(1)
        assert mask == [0] * start + [1] * (len(mask) - start)  # left-padded
        assert ids[:start] == [tokenizer.pad_token_id] * start
        caption_ids = tokenizer(caption, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert ids[start:] == [4] * 16 + [tokenizer.bos_token_id] + prompt_ids + caption_ids
        assert labels == [-100] * (len(ids) - len(caption_ids)) + caption_ids
    assert batch["pixel_values"].shape == (2, 3, 128, 128)


def test_generation_inputs_have_no_labels_and_use_the_config_prefix(processor, tokenizer):
    batch = processor(images=random_images(1))
    assert list(batch.keys()) == ["input_ids", "attention_mask", "pixel_values"]
    assert tokenizer.decode(batch["input_ids"][0, 16:]) == "<bos>caption en\n"


def test_text_with_image_token_is_refused(processor):
    with pytest.raises(ValueError) as error:
        processor(images=random_images(1), text="<image>caption en")
    assert str(error.value) == (
        "text[0]='<image>caption en' contains <image>; the processor inserts the 16 <image> tokens itself. "
        "Pass only the prompt, e.g. 'caption en'."
    )


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"text": ["a", "b", "c"]}, "Got 3 text entries for 2 images; pass one per image."),
        ({"suffix": "one caption"}, "Got one suffix string for 2 images; pass a list with one suffix per image."),
        ({"images": None}, "CNNGemmaProcessor needs images: one PIL image or a list with one image per sample."),
        ({"images": []}, "CNNGemmaProcessor got an empty list of images; pass at least one image, one per sample."),
    ],
)
def test_mismatched_inputs_are_refused(processor, kwargs, message):
    kwargs = {"images": random_images(2), **kwargs}
    with pytest.raises(ValueError) as error:
        processor(**kwargs)
    assert str(error.value) == message


@pytest.mark.parametrize("num_beams", [0, -2])
def test_generate_refuses_fewer_than_one_beam_by_name(tiny_model, processor, num_beams):
    inputs = processor(images=random_images(1))
    message = f"num_beams={num_beams}: expected an integer >= 1 (1 is greedy decoding)."
    with pytest.raises(ValueError) as error:  # transformers itself would raise ZeroDivisionError
        tiny_model.generate(**inputs, num_beams=num_beams, max_new_tokens=2)
    assert str(error.value) == message
    with pytest.raises(ValueError) as error:
        tiny_model.generate(**inputs, generation_config=GenerationConfig(num_beams=num_beams, max_new_tokens=2))
    assert str(error.value) == message


def test_non_image_input_is_refused(processor):
    with pytest.raises(TypeError, match="Expected a PIL image or a uint8 numpy array .*got str"):
        processor(images=["/path/to/image.jpg"])


def test_post_processing_strips_the_prompt(processor, tokenizer):
    batch = processor(images=random_images(2))
    caption_ids = tokenizer(["two red planes", "a ship"], add_special_tokens=False)["input_ids"]
    width = max(len(c) for c in caption_ids) + 1
    generated = torch.tensor(
        [c + [tokenizer.eos_token_id] + [tokenizer.pad_token_id] * (width - len(c) - 1) for c in caption_ids]
    )
    sequences = torch.cat([batch["input_ids"], generated], dim=1)
    expected = ["two red planes", "a ship"]
    assert processor.post_process_image_text_to_text(sequences, input_ids=batch["input_ids"]) == expected
    assert processor.post_process_image_text_to_text(sequences) == expected


def test_processor_refuses_a_tokenizer_that_does_not_match_the_config(tiny_config, tokenizer):
    config = type(tiny_config).from_dict({**tiny_config.to_dict(), "image_token_id": 5})
    with pytest.raises(ValueError, match=r"config.image_token_id=5 but the tokenizer's <image> id is 4"):
        CNNGemmaProcessor.from_model_config(config, tokenizer)


def test_caption_tokenizer_ids_round_trip_and_reload(tmp_path):
    tokenizer = build_caption_tokenizer(synthetic_captions(300), vocab_size=400)
    assert len(tokenizer) <= 400
    assert [tokenizer.convert_tokens_to_ids(t) for t in ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"]] == [
        0,
        1,
        2,
        3,
        4,
    ]
    ids = tokenizer("caption en\n")["input_ids"]
    assert tokenizer.bos_token_id not in ids and tokenizer.eos_token_id not in ids  # nothing added automatically
    assert tokenizer.decode(ids) == "caption en\n"
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded("caption en\n")["input_ids"] == ids
    assert reloaded.decode(ids) == "caption en\n"
    assert reloaded.convert_tokens_to_ids("<image>") == 4


def test_caption_tokenizer_refuses_a_tiny_vocabulary():
    with pytest.raises(ValueError, match="vocab_size=100 is too small: a byte-level BPE needs at least 261 tokens."):
        build_caption_tokenizer(["a"], vocab_size=100)


def test_processor_save_and_reload_round_trips(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    reloaded = CNNGemmaProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    images, captions = random_images(2), ["two ships", "a plane"]
    original, again = processor(images=images, suffix=captions), reloaded(images=images, suffix=captions)
    assert all(torch.equal(original[k], again[k]) for k in original)
    assert (reloaded.num_image_tokens, reloaded.prompt_prefix) == (16, "caption en")
