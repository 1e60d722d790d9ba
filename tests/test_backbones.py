"""from_backbones: pretrained timm / Gemma / PaliGemma parts load completely, or fail fast and say why."""

import time

import pytest
import timm
import torch
from conftest import synthetic_captions
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from modeling_cnngemma import CNNGemmaConfig, CNNGemmaForConditionalGeneration

TEXT_SHAPE = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 32,
}


def gemma_style_tokenizer(with_image_token: bool) -> PreTrainedTokenizerFast:
    """A tokenizer shaped like Gemma's special tokens; plain Gemma has no <image>, PaliGemma's has one."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"] + (["<image>"] if with_image_token else [])
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(synthetic_captions(100), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )


def cnngemma_config(**text) -> CNNGemmaConfig:
    return CNNGemmaConfig(
        vision_model_name="mobilenetv3_small_050",
        image_size=64,
        token_mode="multi",
        text_config={"model_type": "gemma", **TEXT_SHAPE, "vocab_size": 512, **text},
        image_token_id=4,
    )


@pytest.fixture(scope="module")
def gemma_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma")
    tokenizer = gemma_style_tokenizer(with_image_token=False)
    torch.manual_seed(1)
    model = GemmaForCausalLM(
        GemmaConfig(**TEXT_SHAPE, vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1, bos_token_id=2)
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model


def test_gemma_checkpoint_loads_fully_and_gets_an_image_token(gemma_checkpoint, caplog):
    path, gemma = gemma_checkpoint
    old_vocab = gemma.config.vocab_size
    model, tokenizer = CNNGemmaForConditionalGeneration.from_backbones(cnngemma_config(), language_model=path)
    assert tokenizer.convert_tokens_to_ids("<image>") == old_vocab == model.config.image_token_id
    assert model.config.text_config.vocab_size == old_vocab + 1 == model.get_input_embeddings().weight.shape[0]
    assert_decoder_is_the_checkpoints(model, gemma, old_vocab)


def assert_decoder_is_the_checkpoints(model, checkpoint, old_vocab: int):
    """Every decoder tensor equals the checkpoint's (the embeddings up to the rows added for `<image>`), head tied."""
    expected = checkpoint.model.state_dict()
    loaded = model.language_model.state_dict()
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        if key == "embed_tokens.weight":
            assert torch.equal(loaded[key][:old_vocab], value)
        else:
            assert torch.equal(loaded[key], value), key
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_paligemma_checkpoint_gives_its_language_model(tmp_path):
    tokenizer = gemma_style_tokenizer(with_image_token=True)
    config = PaliGemmaConfig(
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 16,
        },
        text_config={"model_type": "gemma", **TEXT_SHAPE, "vocab_size": len(tokenizer)},
        image_token_index=4,
        projection_dim=128,
    )
    torch.manual_seed(2)
    paligemma = PaliGemmaForConditionalGeneration(config)
    paligemma.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, loaded_tokenizer = CNNGemmaForConditionalGeneration.from_backbones(
        cnngemma_config(), language_model=tmp_path
    )
    assert model.config.image_token_id == 4 == loaded_tokenizer.convert_tokens_to_ids("<image>")
    assert model.config.text_config.vocab_size == len(tokenizer)  # <image> already there: no resize
    for key, value in paligemma.model.language_model.state_dict().items():
        assert torch.equal(model.language_model.state_dict()[key], value), key


def test_text_config_that_does_not_match_the_checkpoint(gemma_checkpoint):
    path, _ = gemma_checkpoint
    with pytest.raises(ValueError) as error:
        CNNGemmaForConditionalGeneration.from_backbones(cnngemma_config(hidden_size=256), language_model=path)
    assert str(error.value) == (
        f"The config's text_config does not match the checkpoint {str(path)!r}: hidden_size: config 256 != "
        "checkpoint 128. Use a config whose text_config is the checkpoint's."
    )


def test_timm_weights_file_loads_into_the_tower(tmp_path):
    torch.manual_seed(3)
    source = timm.create_model("mobilenetv3_small_050")
    save_file(source.state_dict(), tmp_path / "weights.safetensors")
    model, _ = CNNGemmaForConditionalGeneration.from_backbones(
        cnngemma_config(), vision_pretrained=tmp_path / "weights.safetensors"
    )
    tower = model.vision_tower.state_dict()
    assert len(tower) > 100
    for key, value in tower.items():
        assert torch.equal(value, source.state_dict()[key]), key


def test_weights_of_another_architecture_are_refused(tmp_path):
    save_file(timm.create_model("resnet18").state_dict(), tmp_path / "resnet.safetensors")
    with pytest.raises(
        ValueError,
        match=r"vision_pretrained=.*resnet.safetensors.* does not fit "
        r"'mobilenetv3_small_050'",
    ):
        CNNGemmaForConditionalGeneration.from_backbones(
            cnngemma_config(), vision_pretrained=tmp_path / "resnet.safetensors"
        )


@pytest.mark.parametrize(
    "kwargs,exception,message",
    [
        (
            {"language_model": "google/gemma-2b"},
            OSError,
            "language_model='google/gemma-2b' looks like a Hub id, but HF_HUB_OFFLINE=1 forbids downloads. "
            "Download it elsewhere and pass the local folder or file instead, or unset HF_HUB_OFFLINE.",
        ),
        (
            {"vision_pretrained": True},
            OSError,
            "vision_pretrained='timm/mobilenetv3_small_050' looks like a Hub id, but HF_HUB_OFFLINE=1 forbids "
            "downloads. Download it elsewhere and pass the local folder or file instead, or unset HF_HUB_OFFLINE.",
        ),
        (
            {"language_model": "./no/such/folder"},
            FileNotFoundError,
            "language_model='./no/such/folder': no such file or folder. Check the path.",
        ),
    ],
)
def test_offline_or_missing_sources_fail_fast(kwargs, exception, message):
    start = time.perf_counter()
    with pytest.raises(exception) as error:
        CNNGemmaForConditionalGeneration.from_backbones(cnngemma_config(), **kwargs)
    assert str(error.value) == message
    assert time.perf_counter() - start < 5
