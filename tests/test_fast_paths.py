"""The vision fast path (`vision_channels_last`) gives the slow path's outputs and survives save/load."""

import pytest
import torch
from conftest import make_tiny_model, random_images

from modeling_cnngemma import CNNGemmaConfig, CNNGemmaForConditionalGeneration

# float32 convolutions reorder their sums in NHWC; measured differences are ~1e-8 on features of size ~1e-2
RTOL, ATOL = 1e-4, 1e-5


def _pair(config):
    """The same weights with the fast path on and off."""
    fast = make_tiny_model(config)
    slow_config = CNNGemmaConfig.from_dict({**config.to_dict(), "vision_channels_last": False})
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
