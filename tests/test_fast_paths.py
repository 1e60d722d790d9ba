"""The vision fast path (`vision_channels_last`: NHWC images into the CNN) gives the NCHW path's outputs."""

import pytest
import torch
from conftest import make_tiny_model, random_images

from modeling_cnngemma import CNNGemmaConfig, CNNGemmaForConditionalGeneration

# float32 convolutions reorder their sums in NHWC; measured differences are ~1e-8 on features of size ~1e-2
RTOL, ATOL = 1e-4, 1e-5


def _pair(config, **slow_fields):
    """The same weights with the fast path on and off."""
    fast = make_tiny_model(config)
    slow_fields = slow_fields or {"vision_channels_last": False}
    slow_config = CNNGemmaConfig.from_dict({**config.to_dict(), **slow_fields})
    slow = CNNGemmaForConditionalGeneration(slow_config).eval()
    slow.load_state_dict(fast.state_dict())
    return fast, slow


def _conv_weights(model):
    return [p for p in model.vision_tower.parameters() if p.ndim == 4 and p.shape[1] > 1 and p.shape[-1] > 1]


def _first_conv_input_layout(model, pixel_values):
    seen = []
    hook = model.vision_tower.conv_stem.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    with torch.no_grad():
        model.get_image_features(pixel_values)
    hook.remove()
    return "channels_last" if seen[0] else "NCHW"


@pytest.mark.parametrize("token_mode", ["single", "multi"])
def test_channels_last_features_equal_nchw_features(tiny_config, token_mode):
    config = CNNGemmaConfig.from_dict({**tiny_config.to_dict(), "token_mode": token_mode})
    fast, slow = _pair(config)
    pixel_values = torch.randn(3, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(0))
    assert (_first_conv_input_layout(fast, pixel_values), _first_conv_input_layout(slow, pixel_values)) == (
        "channels_last",
        "NCHW",
    )
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
    reloaded = CNNGemmaForConditionalGeneration.from_pretrained(tmp_path).eval()
    pixel_values = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    assert reloaded.config.vision_channels_last is True
    assert _first_conv_input_layout(reloaded, pixel_values) == "channels_last"
    with torch.no_grad():
        assert torch.equal(reloaded.get_image_features(pixel_values), tiny_model.get_image_features(pixel_values))


def test_vision_channels_last_must_be_bool(tiny_config):
    with pytest.raises(ValueError, match="vision_channels_last='yes' must be a bool"):
        CNNGemmaConfig.from_dict({**tiny_config.to_dict(), "vision_channels_last": "yes"})


def test_the_channels_last_copy_of_the_images_is_freed_after_the_first_conv(tiny_config):
    """get_image_features hands its channels_last copy of the images straight to the CNN, so nothing holds it once the
    first conv has read it. Held by a local name it would stay alive through the whole forward (19 MB at batch 32)."""
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

    model.vision_tower.conv_stem.register_forward_pre_hook(at_first_conv)
    model.vision_tower.bn1.register_forward_pre_hook(after_first_conv)
    with torch.no_grad():
        model.get_image_features(images)
    assert seen == {"copy": seen["copy"], "is_a_copy": True, "alive_after_first_conv": False}
