"""The vision fast paths (`vision_channels_last`, `vision_fold_batchnorm`) give the slow path's outputs."""

import pytest
import torch
from conftest import make_tiny_model, random_images
from torch import nn

from benchmarks.common import stub_text_config
from modeling_cnngemma import CNNGemmaConfig, CNNGemmaForConditionalGeneration
from modeling_cnngemma.modeling_cnngemma import fold_batchnorm

# float32 convolutions reorder their sums in NHWC; measured differences are ~1e-8 on features of size ~1e-2
RTOL, ATOL = 1e-4, 1e-5


def _pair(config, **slow_fields):
    """The same weights with the fast paths on and off (both off unless `slow_fields` says which)."""
    fast = make_tiny_model(config)
    slow_fields = slow_fields or {"vision_channels_last": False, "vision_fold_batchnorm": False}
    slow_config = CNNGemmaConfig.from_dict({**config.to_dict(), **slow_fields})
    slow = CNNGemmaForConditionalGeneration(slow_config).eval()
    slow.load_state_dict(fast.state_dict())
    return fast, slow


def _conv_weights(model):
    return [p for p in model.vision_tower.parameters() if p.ndim == 4 and p.shape[1] > 1 and p.shape[-1] > 1]


@pytest.mark.parametrize("token_mode", ["single", "multi"])
def test_channels_last_features_equal_nchw_features(tiny_config, token_mode):
    config = CNNGemmaConfig.from_dict({**tiny_config.to_dict(), "token_mode": token_mode})
    fast, slow = _pair(config)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in _conv_weights(fast))
    assert all(p.is_contiguous() for p in _conv_weights(slow))
    pixel_values = torch.randn(3, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            fast.get_image_features(pixel_values), slow.get_image_features(pixel_values), rtol=RTOL, atol=ATOL
        )


def test_channels_last_gives_same_captions_and_gradients(tiny_config, processor):
    fast, slow = _pair(tiny_config)
    batch = processor(images=random_images(2), return_tensors="pt")
    with torch.no_grad():
        tokens_fast = fast.generate(**batch, max_new_tokens=6, do_sample=False)
        tokens_slow = slow.generate(**batch, max_new_tokens=6, do_sample=False)
    assert torch.equal(tokens_fast, tokens_slow)
    # backward through the tower (BatchNorm in eval, as when it is frozen): the same gradients, relative to their size
    for model in (fast, slow):
        model.get_image_features(batch["pixel_values"]).square().sum().backward()
    for grad_fast, grad_slow in zip(
        [p.grad for p in _conv_weights(fast)], [p.grad for p in _conv_weights(slow)], strict=True
    ):
        torch.testing.assert_close(grad_fast, grad_slow, rtol=RTOL, atol=ATOL * grad_slow.abs().max().item())


def test_channels_last_survives_save_and_from_pretrained(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    reloaded = CNNGemmaForConditionalGeneration.from_pretrained(tmp_path)
    # the checkpoint stores NCHW tensors; loading must not silently drop the fast path
    assert reloaded.config.vision_channels_last is True
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in _conv_weights(reloaded))
    reloaded, info = CNNGemmaForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in _conv_weights(reloaded))


def test_vision_channels_last_must_be_bool(tiny_config):
    with pytest.raises(ValueError, match="vision_channels_last='yes' must be a bool"):
        CNNGemmaConfig.from_dict({**tiny_config.to_dict(), "vision_channels_last": "yes"})


# ------------------------------------------------------------------------------------------------ BatchNorm folding
# Folding turns conv-then-scale into one conv with scaled weights: float32 rounding only, measured at ~2e-6 of the
# features' size for both encoders with the statistics below.
FOLD_RTOL, FOLD_ATOL = 1e-4, 1e-5


def _with_batchnorm_statistics(model, seed: int = 0):
    """timm initialises BatchNorm as the identity (mean 0, var 1, gamma 1, beta 0), which folding would leave alone;
    trained towers are far from it, so draw statistics and affine weights that make every fold change the conv."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                shape = module.running_mean.shape
                module.running_mean.copy_(0.5 * torch.randn(shape, generator=generator))
                module.running_var.copy_(0.5 + 1.5 * torch.rand(shape, generator=generator))
                module.weight.copy_(0.5 + torch.rand(shape, generator=generator))
                module.bias.copy_(0.5 * torch.randn(shape, generator=generator))
    return model


def _encoder_model(vision_model_name, token_mode="multi"):
    """A report encoder with a stub decoder, at 64 px: folding depends on the CNN only."""
    config = CNNGemmaConfig(
        vision_model_name=vision_model_name,
        image_size=64,
        token_mode=token_mode,
        text_config=stub_text_config(hidden_size=32),
        image_token_id=4,
    )
    torch.manual_seed(0)
    return _with_batchnorm_statistics(CNNGemmaForConditionalGeneration(config).eval())


def _tower_in_use(model):
    """The tower `get_image_features` runs at inference (under no_grad, as generate() calls it)."""
    with torch.no_grad():
        return model.model.inference_vision_tower()


def _unfolded_features(model, pixel_values):
    model.config.vision_fold_batchnorm = False
    try:
        with torch.no_grad():
            return model.get_image_features(pixel_values)
    finally:
        model.config.vision_fold_batchnorm = True


@pytest.mark.parametrize("vision_model_name", ["mobilenetv3_large_100", "efficientnet_b0", "mobilenetv3_small_050"])
def test_folded_batchnorm_gives_the_unfolded_features(vision_model_name):
    model = _encoder_model(vision_model_name)
    pixel_values = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        folded_features = model.get_image_features(pixel_values)
    folded = _tower_in_use(model)
    # every BatchNorm of these towers follows a conv, so none is left to run
    assert folded is not model.vision_tower
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.vision_tower.modules()) > 10
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    expected = _unfolded_features(model, pixel_values)
    assert not torch.equal(folded_features, expected)  # the folded path really ran
    torch.testing.assert_close(folded_features, expected, rtol=FOLD_RTOL, atol=FOLD_ATOL * expected.abs().max().item())


def test_folded_batchnorm_gives_the_same_captions(tiny_config, processor):
    fast, slow = _pair(tiny_config, vision_fold_batchnorm=False)
    for model in (fast, slow):
        _with_batchnorm_statistics(model)
    batch = processor(images=random_images(2), return_tensors="pt")
    with torch.no_grad():
        tokens_fast = fast.generate(**batch, max_new_tokens=6, do_sample=False)
        tokens_slow = slow.generate(**batch, max_new_tokens=6, do_sample=False)
    assert fast.model._folded_tower is not None and slow.model._folded_tower is None  # generate built it
    assert _tower_in_use(fast) is not fast.vision_tower
    assert _tower_in_use(slow) is slow.vision_tower
    assert torch.equal(tokens_fast, tokens_slow)


def test_folding_waits_for_eval_mode_and_no_tower_gradient():
    model = _encoder_model("mobilenetv3_large_100", token_mode="single")
    tower = model.vision_tower
    pixel_values = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    # grad enabled and the tower trainable: the real tower runs and its weights get gradients
    assert model.model.inference_vision_tower() is tower
    model.get_image_features(pixel_values).sum().backward()
    assert all(p.grad is not None for p in tower.parameters())
    # a frozen tower may fold even with grad enabled (the decoder trains, the tower does not)
    tower.requires_grad_(False)
    assert model.model.inference_vision_tower() is not tower
    tower.requires_grad_(True)
    with torch.no_grad():
        assert model.model.inference_vision_tower() is not tower
        model.train()  # BatchNorm on batch statistics cannot be folded
        assert model.model.inference_vision_tower() is tower
        model.eval()
        model.config.vision_fold_batchnorm = False
        assert model.model.inference_vision_tower() is tower
        model.config.vision_fold_batchnorm = True


def _checked_tower(model, pixel_values):
    """Checks the features of the tower in use against the unfolded tower's; returns the tower in use."""
    with torch.no_grad():
        folded = model.get_image_features(pixel_values)
    expected = _unfolded_features(model, pixel_values)
    torch.testing.assert_close(folded, expected, rtol=FOLD_RTOL, atol=FOLD_ATOL * expected.abs().max().item())
    return _tower_in_use(model)


def test_folded_copy_follows_weight_changes():
    """An optimizer step, load_state_dict and a dtype change each rebuild the folded copy; nothing stale is used."""
    model = _encoder_model("efficientnet_b0")
    pixel_values = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))

    first = _checked_tower(model, pixel_values)
    # an optimizer step on the tower (in eval mode, as the report's frozen-statistics fine-tuning does)
    optimizer = torch.optim.SGD(model.vision_tower.parameters(), lr=0.5)
    model.get_image_features(pixel_values).square().sum().backward()
    optimizer.step()
    second = _checked_tower(model, pixel_values)
    assert second is not first
    # load_state_dict copies in place
    other = _with_batchnorm_statistics(_encoder_model("efficientnet_b0"), seed=7)
    model.load_state_dict(other.state_dict())
    third = _checked_tower(model, pixel_values)
    assert third is not second
    # unchanged weights reuse the copy
    assert _checked_tower(model, pixel_values) is third
    model.to(torch.float64)
    assert model.model._folded_tower is None  # a move frees the copy at once
    pixel_values = pixel_values.double()
    assert _checked_tower(model, pixel_values) is not third
    assert next(_tower_in_use(model).parameters()).dtype == torch.float64


def test_folded_copy_follows_replaced_modules_and_weights():
    """A child module or a weight swapped for a new object, and a move of the tower alone (not through the model's
    `.to()`), each rebuild the copy: the per-call state check sees what `_foldable_tensors` would."""
    model = _encoder_model("mobilenetv3_large_100", token_mode="single")
    tower = model.vision_tower
    pixel_values = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))

    first = _checked_tower(model, pixel_values)
    assert _checked_tower(model, pixel_values) is first  # nothing changed: the copy is reused
    tower.conv_stem.weight = nn.Parameter(-tower.conv_stem.weight.detach().clone())
    second = _checked_tower(model, pixel_values)
    assert second is not first
    tower.blocks[0][0].bn1.act = nn.Tanh().eval()  # a child of a BatchNormAct2d: the fold must keep the new activation
    third = _checked_tower(model, pixel_values)
    assert third is not second and isinstance(third.blocks[0][0].bn1, nn.Tanh)  # the BatchNorm folded away
    tower.to(torch.float64)  # the tower alone: the projector stays float32, so compare the towers themselves
    fourth = _tower_in_use(model)
    assert fourth is not third and next(fourth.parameters()).dtype == torch.float64
    with torch.no_grad():
        expected = tower.forward_features(pixel_values.double())
        # folded in float64 too: only float64 rounding is left
        torch.testing.assert_close(fourth.forward_features(pixel_values.double()), expected, rtol=1e-9, atol=1e-12)


def test_folding_leaves_the_global_random_state_alone():
    model = _encoder_model("mobilenetv3_large_100", token_mode="single")
    pixel_values = torch.randn(1, 3, 64, 64)
    torch.manual_seed(3)
    with torch.no_grad():
        model.get_image_features(pixel_values)  # builds the folded copy, which runs a probe image
    assert model.model._folded_tower is not None
    after_fold = torch.rand(4)
    torch.manual_seed(3)
    assert torch.equal(torch.rand(4), after_fold)


def test_towers_that_a_copy_cannot_stand_in_for_run_unfolded():
    """A hook, a BatchNorm in train mode and a peft adapter each keep the real tower; so does an edit via `.data`
    once `forget_folded_tower()` is called (its version counter does not move)."""
    from peft import LoraConfig, inject_adapter_in_model

    model = _encoder_model("mobilenetv3_small_050", token_mode="single")
    tower = model.vision_tower
    pixel_values = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    assert _tower_in_use(model) is not tower

    seen = []
    hook = tower.conv_stem.register_forward_hook(lambda module, args, output: seen.append(output.shape[0]))
    with torch.no_grad():
        model.get_image_features(pixel_values)
    assert _tower_in_use(model) is tower and seen == [2]  # the hook saw the real batch only, never a probe
    hook.remove()

    norm = next(m for m in tower.modules() if isinstance(m, nn.BatchNorm2d))
    norm.train()  # test-time adaptation of one BatchNorm
    tracked = int(norm.num_batches_tracked)
    with torch.no_grad():
        model.get_image_features(pixel_values)
        model.get_image_features(pixel_values)
    assert _tower_in_use(model) is tower and int(norm.num_batches_tracked) == tracked + 2
    norm.eval()

    with torch.no_grad():
        before = model.get_image_features(pixel_values)
        tower.conv_stem.weight.data.mul_(0.5)
        model.model.forget_folded_tower()
        after = model.get_image_features(pixel_values)
    assert not torch.allclose(before, after)
    expected = _unfolded_features(model, pixel_values)
    torch.testing.assert_close(after, expected, rtol=FOLD_RTOL, atol=FOLD_ATOL * expected.abs().max().item())

    inject_adapter_in_model(LoraConfig(r=2, target_modules=["conv_stem"], init_lora_weights=False), tower)
    tower.requires_grad_(False)
    with torch.no_grad():
        adapted = model.get_image_features(pixel_values)
    assert _tower_in_use(model) is tower
    assert not torch.allclose(adapted, after)  # the adapter runs


class _ConvReadTwice(nn.Module):
    """A conv whose output feeds its BatchNorm and a residual: folding the BatchNorm would change the residual."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)

    def forward_features(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_fold_batchnorm_refuses_a_fold_that_changes_the_output():
    tower = _with_batchnorm_statistics(_ConvReadTwice().eval())
    example = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    result, count = fold_batchnorm(tower, example)
    assert result is tower and count == 0
    # the same conv and BatchNorm in a plain chain do fold
    chain = _with_batchnorm_statistics(nn.Sequential(tower.conv, tower.bn).eval())
    chain.forward_features = chain.forward
    result, count = fold_batchnorm(chain, example)
    assert result is not chain and count == 1
    torch.testing.assert_close(result(example), chain(example), rtol=FOLD_RTOL, atol=FOLD_ATOL)
    # a BatchNorm without affine weights folds too
    plain = nn.BatchNorm2d(3, affine=False)
    plain.running_mean.copy_(tower.bn.running_mean)
    plain.running_var.copy_(tower.bn.running_var)
    chain = nn.Sequential(tower.conv, plain).eval()
    chain.forward_features = chain.forward
    result, count = fold_batchnorm(chain, example)
    assert count == 1 and not any(isinstance(m, nn.BatchNorm2d) for m in result.modules())
    torch.testing.assert_close(result(example), chain(example), rtol=FOLD_RTOL, atol=FOLD_ATOL)


def test_vision_fold_batchnorm_must_be_bool(tiny_config):
    with pytest.raises(ValueError, match="vision_fold_batchnorm=1 must be a bool"):
        CNNGemmaConfig.from_dict({**tiny_config.to_dict(), "vision_fold_batchnorm": 1})


def test_the_channels_last_copy_of_the_images_is_freed_after_the_first_conv(tiny_config):
    """get_image_features hands its channels_last copy of the images straight to the CNN, so nothing holds it once the
    first conv has read it. Held by a local name it would stay alive through the whole forward (19 MB at batch 32),
    and on CPU glibc would page-fault that much more on every call (benchmarks/README.md, CPU memory)."""
    import weakref

    model = make_tiny_model(tiny_config)
    size = tiny_config.image_size
    images = torch.randn(2, 3, size, size)  # NCHW float32: the channels_last default makes a copy
    seen = {}

    def at_first_conv(module, args):
        seen["copy"] = weakref.ref(args[0])
        seen["is_a_copy"] = args[0] is not images and args[0].is_contiguous(memory_format=torch.channels_last)

    def after_first_conv(module, args):
        seen["alive_after_first_conv"] = seen["copy"]() is not None

    # hooks make CNNGemma run the tower itself (a folded copy cannot stand in for a hooked module)
    model.vision_tower.conv_stem.register_forward_pre_hook(at_first_conv)
    model.vision_tower.bn1.register_forward_pre_hook(after_first_conv)
    with torch.no_grad():
        model.get_image_features(images)
    assert seen == {"copy": seen["copy"], "is_a_copy": True, "alive_after_first_conv": False}
