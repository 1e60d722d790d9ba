"""CNNGemma model behaviour on the tiny config: loss, gradients, freezing, generation, save/load, errors."""

import pytest
import torch
from conftest import make_tiny_model, random_images, synthetic_captions

from modeling_cnngemma import CNNGemmaConfig, CNNGemmaForConditionalGeneration


@pytest.fixture()
def batch(processor):
    return processor(images=random_images(4), suffix=synthetic_captions(4, seed=1))


def test_forward_returns_loss_logits_and_image_states(tiny_model, batch, tiny_config):
    with torch.no_grad():
        out = tiny_model(**batch)
    seq = batch["input_ids"].shape[1]
    assert out.logits.shape == (4, seq, tiny_config.text_config.vocab_size)
    assert out.image_hidden_states.shape == (4, 16, 128)
    assert torch.isfinite(out.loss)
    # the loss counts caption tokens only: it equals cross-entropy over the labelled positions
    shift_logits, shift_labels = out.logits[:, :-1], batch["labels"][:, 1:]
    expected = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, expected)


def test_loss_falls_when_training_one_batch(tiny_config, batch):
    model = make_tiny_model(tiny_config).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize(
    "trainable",
    [
        {"vision_tower": False, "multi_modal_projector": True, "language_model": False},
        {"vision_tower": True, "multi_modal_projector": True, "language_model": False},
        {"vision_tower": False, "multi_modal_projector": True, "language_model": True},
    ],
)
def test_gradients_only_on_trainable_parts_and_frozen_batchnorm_stays(tiny_config, batch, trainable):
    model = make_tiny_model(tiny_config)
    model.set_trainable(**trainable)
    model.train()
    bn_before = {k: v.clone() for k, v in model.vision_tower.state_dict().items() if "running" in k}
    model(**batch).loss.backward()
    parts = {
        "vision_tower": model.model.vision_tower,
        "multi_modal_projector": model.model.multi_modal_projector,
        "language_model": model.model.language_model,
    }
    for name, module in parts.items():
        grads = [p.grad for p in module.parameters()]
        if trainable[name]:
            assert all(g is not None for g in grads), name
            assert any(g.abs().sum() > 0 for g in grads), name
        else:
            assert all(g is None for g in grads), name
    assert model.vision_tower.training == trainable["vision_tower"]
    bn_after = {k: v for k, v in model.vision_tower.state_dict().items() if "running" in k}
    moved = any(not torch.equal(bn_before[k], bn_after[k]) for k in bn_before)
    assert moved == trainable["vision_tower"]


def test_vision_tower_keeps_timm_init_after_post_init(tiny_config):
    model = make_tiny_model(tiny_config)
    # transformers' generic init would set every BatchNorm weight to exactly 1 and draw convs with std 0.02
    bn_vars = [m.running_var for m in model.vision_tower.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(v, torch.ones_like(v)) for v in bn_vars)
    conv_std = model.vision_tower.conv_stem.weight.std().item()
    assert conv_std > 0.05, conv_std  # timm's fan-out init for a 3x3x3 stem, not 0.02


def test_cached_and_uncached_greedy_give_identical_tokens(tiny_model, processor):
    inputs = processor(images=random_images(3, seed=2), text=["caption en", "caption en", "caption"])
    cached = tiny_model.generate(**inputs, max_new_tokens=12, do_sample=False, use_cache=True)
    uncached = tiny_model.generate(**inputs, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    new_tokens = cached[:, inputs["input_ids"].shape[1] :]
    assert len(set(new_tokens.flatten().tolist())) > 3  # a real sequence, not one repeated token


def test_padded_batch_generation_equals_one_by_one(tiny_model, processor):
    images = random_images(3, seed=3)
    prompts = ["caption en", "caption en with a much longer prompt", "caption"]
    batch = processor(images=images, text=prompts)
    assert (batch["attention_mask"] == 0).any(), "the prompts must need padding for this test to mean anything"
    with torch.no_grad():
        batch_logits = tiny_model(**batch).logits[:, -1]
    batched = tiny_model.generate(**batch, max_new_tokens=10, do_sample=False)[:, batch["input_ids"].shape[1] :]
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        single = processor(images=image, text=prompt)
        with torch.no_grad():
            single_logits = tiny_model(**single).logits[:, -1]
        # logits agree within float tolerance (padding changes the summation order only)
        torch.testing.assert_close(batch_logits[i : i + 1], single_logits, atol=1e-4, rtol=1e-4)
        alone = tiny_model.generate(**single, max_new_tokens=10, do_sample=False)[:, single["input_ids"].shape[1] :]
        assert torch.equal(batched[i], alone[0]), f"row {i}: {batched[i].tolist()} != {alone[0].tolist()}"


def test_beam_search_and_sampling_generate(tiny_model, processor):
    inputs = processor(images=random_images(2, seed=4))
    prompt_len = inputs["input_ids"].shape[1]
    beams = tiny_model.generate(**inputs, max_new_tokens=6, num_beams=3, do_sample=False)
    torch.manual_seed(0)
    sampled_a = tiny_model.generate(**inputs, max_new_tokens=6, do_sample=True, top_k=50)
    torch.manual_seed(0)
    sampled_b = tiny_model.generate(**inputs, max_new_tokens=6, do_sample=True, top_k=50)
    assert beams.shape[0] == 2 and prompt_len < beams.shape[1] <= prompt_len + 6
    assert torch.equal(sampled_a, sampled_b)


def test_save_and_reload_give_identical_logits_and_tokens(tiny_model, processor, saved_model_dir):
    reloaded = CNNGemmaForConditionalGeneration.from_pretrained(saved_model_dir).eval()
    inputs = processor(images=random_images(2, seed=5), suffix=synthetic_captions(2, seed=5))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, tiny_model(**inputs).logits, atol=0, rtol=0)
    gen = processor(images=random_images(2, seed=5))
    assert torch.equal(
        reloaded.generate(**gen, max_new_tokens=8, do_sample=False),
        tiny_model.generate(**gen, max_new_tokens=8, do_sample=False),
    )
    assert reloaded.lm_head.weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()
    generation_config = reloaded.generation_config
    assert (generation_config.max_new_tokens, generation_config.eos_token_id, generation_config.pad_token_id) == (
        32,
        1,
        0,
    )


def test_token_feature_mismatch_error(tiny_model, processor):
    inputs = processor(images=random_images(2, seed=6))
    input_ids = inputs["input_ids"].clone()
    input_ids[0, input_ids[0].tolist().index(4)] = 5  # drop one <image> token of the first row
    with pytest.raises(ValueError) as error:
        tiny_model(input_ids=input_ids, pixel_values=inputs["pixel_values"], attention_mask=inputs["attention_mask"])
    assert str(error.value) == (
        "Image features and image tokens do not match: tokens: 31, features: 32 (2 images x 16 tokens each). "
        "Build the inputs with CNNGemmaProcessor, which inserts 16 `<image>` tokens per image."
    )


def test_image_tokens_without_pixel_values_error(tiny_model, processor):
    inputs = processor(images=random_images(1))
    with pytest.raises(ValueError, match="input_ids contain `<image>` placeholders but no pixel_values were given"):
        tiny_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_other_gemma_family_decoders(model_type, processor, tiny_config):
    text = {
        k: v
        for k, v in tiny_config.text_config.to_dict().items()
        if k
        in (
            "hidden_size",
            "num_hidden_layers",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "vocab_size",
            "pad_token_id",
            "bos_token_id",
            "eos_token_id",
        )
    }
    config = CNNGemmaConfig(
        vision_model_name=tiny_config.vision_model_name,
        image_size=tiny_config.image_size,
        token_mode="multi",
        text_config={"model_type": model_type, **text},
        image_token_id=4,
    )
    model = make_tiny_model(config)
    inputs = processor(images=random_images(2, seed=7), suffix=synthetic_captions(2, seed=7))
    out = model(**inputs)
    assert torch.isfinite(out.loss) and type(model.language_model).__name__.lower().startswith(model_type[:6])
    gen = processor(images=random_images(2, seed=7))
    assert torch.equal(
        model.generate(**gen, max_new_tokens=5, do_sample=False, use_cache=True),
        model.generate(**gen, max_new_tokens=5, do_sample=False, use_cache=False),
    )


def test_mlp_projector_and_single_token_mode(tiny_config, tokenizer):
    from modeling_cnngemma import CNNGemmaProcessor

    config = CNNGemmaConfig.from_dict({**tiny_config.to_dict(), "projector_type": "mlp", "token_mode": "single"})
    model = make_tiny_model(config)
    processor = CNNGemmaProcessor.from_model_config(config, tokenizer)
    inputs = processor(images=random_images(2), suffix=synthetic_captions(2))
    assert (inputs["input_ids"] == 4).sum(dim=1).tolist() == [1, 1]
    out = model(**inputs)
    assert out.image_hidden_states.shape == (2, 1, 128) and torch.isfinite(out.loss)
    assert {n for n, _ in model.multi_modal_projector.named_children()} == {"linear_1", "act", "linear_2"}


def test_dtype_loading_and_no_split_modules(saved_model_dir):
    model = CNNGemmaForConditionalGeneration.from_pretrained(saved_model_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {"GemmaDecoderLayer", "CNNGemmaMultiModalProjector", "MobileNetV3"} <= set(model._no_split_modules)
    assert model.config._attn_implementation == "sdpa"


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_config, batch):
    plain, checkpointed = make_tiny_model(tiny_config), make_tiny_model(tiny_config)
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert checkpointed.language_model.gradient_checkpointing
    losses = []
    for model in (plain, checkpointed):
        model.train()
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1])
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_device_map_auto_loads_and_generates(saved_model_dir, tiny_model, processor):
    model = CNNGemmaForConditionalGeneration.from_pretrained(saved_model_dir, device_map="auto").eval()
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    inputs = processor(images=random_images(2, seed=12))
    assert torch.equal(
        model.generate(**inputs, max_new_tokens=6, do_sample=False),
        tiny_model.generate(**inputs, max_new_tokens=6, do_sample=False),
    )
