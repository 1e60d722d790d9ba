"""The Gemma 3 270M variants: a Gemma 3 checkpoint loads through from_backbones, and the shipped *_270m.json files
have Gemma 3 270M's text shape."""

import importlib.util

import pytest
import torch
from conftest import REPO_ROOT, random_images
from test_backbones import assert_decoder_is_the_checkpoints, gemma_style_tokenizer
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from cnngemma.backbones import from_backbones
from modeling_cnngemma import CNNGemmaConfig, CNNGemmaProcessor

VARIANTS_270M = [
    "mobilenet_single_270m",
    "mobilenet_multi_270m",
    "efficientnet_single_270m",
    "efficientnet_multi_270m",
    "lite0_single_270m",
    "lite0_grid3_270m",
    "lite0_multi_270m",
]

# Gemma 3 270M's layout at test size: a sliding layer with a window shorter than the prompt, then a global one.
TINY_GEMMA3 = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "query_pre_attn_scalar": 16,
    "sliding_window": 4,
    "layer_types": ["sliding_attention", "full_attention"],
}


def load_make_configs():
    spec = importlib.util.spec_from_file_location("make_configs", REPO_ROOT / "scripts" / "make_configs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gemma3_checkpoint(tmp_path_factory):
    """A random Gemma3ForCausalLM whose tokenizer, like Gemma 3's, has one token past the embeddings
    (`<image_soft_token>`) and no `<image>`."""
    path = tmp_path_factory.mktemp("gemma3")
    tokenizer = gemma_style_tokenizer(with_image_token=False)
    vocab_size = len(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image_soft_token>"]})
    torch.manual_seed(5)
    model = Gemma3ForCausalLM(
        Gemma3TextConfig(**TINY_GEMMA3, vocab_size=vocab_size, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    ).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model


def test_gemma3_checkpoint_loads_exactly_and_captions(gemma3_checkpoint):
    path, gemma3 = gemma3_checkpoint
    config = CNNGemmaConfig(
        vision_model_name="mobilenetv3_small_050",
        image_size=64,
        token_mode="multi",
        text_config={"model_type": "gemma3_text", **TINY_GEMMA3, "vocab_size": 512},
        image_token_id=4,
    )
    model, tokenizer = from_backbones(config, language_model=path)
    model.eval()

    # `<image>` goes after `<image_soft_token>`, as with the real Gemma 3 tokenizer (see configuration/README.md)
    old_vocab = gemma3.config.vocab_size
    assert tokenizer.convert_tokens_to_ids("<image>") == old_vocab + 1 == model.config.image_token_id
    assert model.config.text_config.vocab_size == old_vocab + 2 == model.get_input_embeddings().weight.shape[0]
    assert type(model.language_model).__name__ == "Gemma3TextModel"
    assert model.config.text_config.layer_types == TINY_GEMMA3["layer_types"]

    assert_decoder_is_the_checkpoints(model, gemma3, old_vocab)

    # Text without an image runs exactly the checkpoint's decoder and head.
    ids = tokenizer("there are two red planes in the centre", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits[..., :old_vocab], gemma3(input_ids=ids).logits)

    processor = CNNGemmaProcessor.from_model_config(model.config, tokenizer)
    inputs = processor(images=random_images(1, seed=4))
    assert inputs["input_ids"].shape[1] > TINY_GEMMA3["sliding_window"]  # the sliding layer must slide
    cached = model.generate(**inputs, max_new_tokens=5, do_sample=False, use_cache=True)
    uncached = model.generate(**inputs, max_new_tokens=5, do_sample=False, use_cache=False)
    assert cached.shape == (1, inputs["input_ids"].shape[1] + 5)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("name", VARIANTS_270M)
def test_shipped_270m_configs_have_gemma3_270m_text_shape(name):
    make_configs = load_make_configs()
    shipped = CNNGemmaConfig.from_json_file(REPO_ROOT / "configuration" / f"{name}.json")
    published = Gemma3TextConfig(**make_configs.GEMMA3_270M_TEXT_CONFIG)
    # One row past the GGUF tokenizer's 262,144 tokens: the `<image>` that from_backbones appends.
    assert shipped.image_token_id == make_configs.GEMMA3_TOKENIZER_SIZE == published.vocab_size
    assert shipped.text_config.vocab_size == make_configs.GEMMA3_TOKENIZER_SIZE + 1
    published.vocab_size = shipped.text_config.vocab_size
    assert shipped.text_config.to_dict() == published.to_dict()


def test_270m_decoder_parameter_count():
    make_configs = load_make_configs()
    config = CNNGemmaConfig.from_json_file(REPO_ROOT / "configuration" / "mobilenet_single_270m.json")
    text = config.text_config
    embedding = text.vocab_size * text.hidden_size  # tied to lm_head: counted once
    attention = text.hidden_size * text.head_dim * (2 * text.num_attention_heads + 2 * text.num_key_value_heads)
    mlp = 3 * text.hidden_size * text.intermediate_size
    norms = 4 * text.hidden_size + 2 * text.head_dim  # 4 RMSNorms around attention and MLP, q_norm and k_norm
    expected = embedding + text.num_hidden_layers * (attention + mlp + norms) + text.hidden_size  # + final norm
    measured = make_configs.count_parameters(config)["language_model"]
    assert measured == expected
    assert 265e6 < measured < 271e6, measured  # Gemma 3 270M: ~170M embedding + ~100M transformer parameters
