"""CNNGemma: PaliGemma's layout with a timm CNN as the vision tower, for cheap satellite and aerial captioning.

vision_tower (timm CNN) -> multi_modal_projector -> scattered into the `<image>` slots of a Gemma-family decoder.
"""

import os
from dataclasses import dataclass
from functools import lru_cache

import timm
import torch
from huggingface_hub import is_offline_mode
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, ModelOutput

from .configuration_cnngemma import CNNGemmaConfig

# config.json's auto_map, written by save_pretrained: every entry points at a module file in the folder being written.
AUTO_MAP = {
    "AutoConfig": "configuration_cnngemma.CNNGemmaConfig",
    "AutoModel": "modeling_cnngemma.CNNGemmaModel",
    "AutoModelForImageTextToText": "modeling_cnngemma.CNNGemmaForConditionalGeneration",
}


@dataclass
class CNNGemmaModelOutputWithPast(BaseModelOutputWithPast):
    """Adds `image_hidden_states` (batch, num_image_tokens, hidden): the features that replaced the `<image>` tokens."""

    image_hidden_states: torch.FloatTensor | None = None


@dataclass
class CNNGemmaCausalLMOutputWithPast(ModelOutput):
    """Language-modelling output of CNNGemma: the loss counts caption tokens only (labels are -100 elsewhere)."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None


class CNNGemmaMultiModalProjector(nn.Module):
    """Maps CNN features (vision_feature_dim) to the decoder's width: one Linear, or Linear-GELU-Linear."""

    def __init__(self, config: CNNGemmaConfig):
        super().__init__()
        in_dim, out_dim = config.vision_feature_dim, config.text_config.hidden_size
        if config.projector_type == "linear":
            self.linear = nn.Linear(in_dim, out_dim, bias=True)
        else:
            self.linear_1 = nn.Linear(in_dim, out_dim, bias=True)
            self.act = nn.GELU(approximate="tanh")
            self.linear_2 = nn.Linear(out_dim, out_dim, bias=True)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "linear"):
            return self.linear(image_features)
        return self.linear_2(self.act(self.linear_1(image_features)))


class CNNGemmaPreTrainedModel(PreTrainedModel):
    config_class = CNNGemmaConfig
    config: CNNGemmaConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    # The decoder layers come from the language model's own `_no_split_modules`; the projector stays whole.
    _no_split_modules = ["CNNGemmaMultiModalProjector"]
    _skip_keys_device_placement = "cache"
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True  # decode steps; the prefill with the CNN runs eagerly

    def save_pretrained(self, save_directory, *args, **kwargs):
        # A config loaded from the Hub carries "owner/repo--module.Class" entries: point them at the saved files.
        self.config.auto_map = dict(AUTO_MAP)
        return super().save_pretrained(save_directory, *args, **kwargs)


class CNNGemmaModel(CNNGemmaPreTrainedModel):
    """The timm CNN, the projector and the Gemma-family decoder, without a language-modelling head."""

    def __init__(self, config: CNNGemmaConfig):
        super().__init__(config)
        self.vision_tower = build_vision_tower(config)
        # timm initialised the tower; post_init()'s generic `_init_weights` would re-draw its convs and reset BatchNorm
        for module in self.vision_tower.modules():
            module._is_hf_initialized = True
        # The tower is not a PreTrainedModel, so device_map="auto" must be told to keep it on one device.
        self._no_split_modules = [*self._no_split_modules, type(self.vision_tower).__name__]
        self.multi_modal_projector = CNNGemmaMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_image_features(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """Projected image features of shape (B, num_image_tokens, hidden_size)."""
        # oneDNN and cuDNN run NHWC convolutions natively; the copy goes straight in (no local), so it is freed early.
        memory_format = torch.channels_last if self.config.vision_channels_last else torch.contiguous_format
        dtype = next(self.vision_tower.parameters()).dtype
        feature_map = self.vision_tower.forward_features(pixel_values.to(dtype=dtype, memory_format=memory_format))
        if self.config.token_mode != "multi":  # "single" is the 1x1 grid
            feature_map = nn.functional.adaptive_avg_pool2d(feature_map, self.config.token_grid or 1)
        features = feature_map.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C); H = W = k when pooled
        return self.multi_modal_projector(features)

    def get_placeholder_mask(self, input_ids: torch.LongTensor, image_features: torch.Tensor) -> torch.BoolTensor:
        """Where the `<image>` tokens are; raises when their count differs from the number of image features."""
        image_mask = input_ids == self.config.image_token_id
        num_tokens, num_features = int(image_mask.sum()), image_features.shape[0] * image_features.shape[1]
        if num_tokens != num_features:
            raise ValueError(
                f"Image features and image tokens do not match: tokens: {num_tokens}, features: {num_features} "
                f"({image_features.shape[0]} images x {image_features.shape[1]} tokens each). Build the inputs with "
                f"CNNGemmaProcessor, which inserts {self.config.num_image_tokens} `<image>` tokens per image."
            )
        return image_mask

    @staticmethod
    def _is_eager_prefill(cache: Cache | None) -> bool:
        """True on a first, uncompiled call. Compiled decode steps skip the checks that would need the host."""
        return not torch.compiler.is_compiling() and (cache is None or cache.get_seq_length() == 0)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> CNNGemmaModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds.")

        # 1. text embeddings (Gemma multiplies by sqrt(hidden_size) inside embed_tokens; image features are not scaled)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        # 2. image features replace the <image> placeholders
        image_features = None
        if pixel_values is not None:
            if input_ids is None:
                raise ValueError("pixel_values need input_ids with `<image>` placeholders to know where to go.")
            image_features = self.get_image_features(pixel_values).to(inputs_embeds.device, inputs_embeds.dtype)
            image_mask = self.get_placeholder_mask(input_ids, image_features)
            inputs_embeds = inputs_embeds.masked_scatter(image_mask.unsqueeze(-1), image_features)
        elif (
            input_ids is not None and self._is_eager_prefill(cache) and (input_ids == self.config.image_token_id).any()
        ):
            raise ValueError(
                "input_ids contain `<image>` placeholders but no pixel_values were given; pass the images that the "
                "processor built these inputs for."
            )

        # 3. positions count real tokens only, so a left-padded row sees the same positions as when alone (generate
        # passes its own, computed the same way; the mask covers the cached tokens too, so the last ones are ours)
        if position_ids is None and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -inputs_embeds.shape[1] :]

        # 4. the decoder, causal over the whole sequence
        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        return CNNGemmaModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_features,
        )


class CNNGemmaForConditionalGeneration(CNNGemmaPreTrainedModel, GenerationMixin):
    """CNNGemma with a language-modelling head tied to the token embeddings: captions images with `generate`."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: CNNGemmaConfig):
        super().__init__(config)
        self.model = CNNGemmaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()
        text_config = config.text_config
        self.generation_config.max_new_tokens = 32
        self.generation_config.bos_token_id = text_config.bos_token_id
        self.generation_config.eos_token_id = text_config.eos_token_id
        self.generation_config.pad_token_id = text_config.pad_token_id

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.vision_tower

    @property
    def multi_modal_projector(self) -> CNNGemmaMultiModalProjector:
        return self.model.multi_modal_projector

    @property
    def language_model(self) -> PreTrainedModel:
        return self.model.language_model

    def get_image_features(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        return self.model.get_image_features(pixel_values)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CNNGemmaCausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        softcap = getattr(self.config.text_config, "final_logit_softcapping", None)
        if softcap is not None:  # Gemma 2 and 3
            logits = torch.tanh(logits / softcap) * softcap

        loss = None
        if labels is not None:
            # labels are -100 on image, prompt and padding positions: only caption tokens (and <eos>) count
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size)

        return CNNGemmaCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
        )

    def generate(self, *args, **kwargs):  # refuses num_beams < 1 by name: transformers would divide by zero
        beams = kwargs.get("num_beams", (kwargs.get("generation_config") or self.generation_config).num_beams)
        if beams is not None and beams < 1:
            raise ValueError(f"num_beams={beams}: expected an integer >= 1 (1 is greedy decoding).")
        return super().generate(*args, **kwargs)

    def set_trainable(self, *, vision_tower: bool, multi_modal_projector: bool, language_model: bool):
        """Freezes or unfreezes each part. A frozen CNN is kept in eval mode so its BatchNorm statistics never move."""
        self.model.vision_tower.requires_grad_(vision_tower)
        self.model.multi_modal_projector.requires_grad_(multi_modal_projector)
        self.model.language_model.requires_grad_(language_model)
        self.lm_head.requires_grad_(language_model)  # tied to the embeddings, which belong to the language model
        if not vision_tower:
            self.model.vision_tower.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        # A frozen BatchNorm would still update its running statistics in train mode: keep a frozen CNN in eval.
        if mode and not any(p.requires_grad for p in self.model.vision_tower.parameters()):
            self.model.vision_tower.eval()
        return self


@lru_cache(maxsize=64)
def _unused_children(vision_model_name: str, image_size: int) -> tuple[str, ...]:
    """Top-level children with weights that `forward_features` never calls, like MobileNetV3's 960->1280 `conv_head`:
    dead weights to CNNGemma, which reads the final feature map (and unused parameters break DDP)."""
    called = set()
    with torch.device("meta"):
        model = timm.create_model(vision_model_name, pretrained=False, num_classes=0).eval()
        for name, child in model.named_children():
            child.register_forward_hook(lambda *_, name=name: called.add(name))
        model.forward_features(torch.empty(1, 3, image_size, image_size))
    return tuple(
        n for n, child in model.named_children() if n not in called and next(child.parameters(), None) is not None
    )


def build_vision_tower(config: CNNGemmaConfig, pretrained: bool | str = False) -> nn.Module:
    """The timm CNN without its classifier and unused head. `pretrained`: False, True (timm's Hub weights) or a file."""
    kwargs = {}
    if isinstance(pretrained, (str, os.PathLike)):
        kwargs["pretrained_cfg_overlay"] = {"file": str(pretrained)}
    tower = timm.create_model(config.vision_model_name, pretrained=bool(pretrained), num_classes=0, **kwargs)
    for name in _unused_children(config.vision_model_name, config.image_size):
        setattr(tower, name, nn.Identity())
    return tower


def check_source(path_or_id, argument: str, must_be_local: bool = False):
    """Fails fast, saying what to do, when a local path is missing or a Hub id cannot be downloaded (offline)."""
    text = str(path_or_id)
    if os.path.exists(text):
        return
    if must_be_local or text.startswith((".", "/", "~")) or os.sep + os.sep in text or text.count("/") > 1:
        raise FileNotFoundError(f"{argument}={text!r}: no such file or folder. Check the path.")
    if is_offline_mode():
        raise OSError(
            f"{argument}={text!r} looks like a Hub id, but HF_HUB_OFFLINE=1 forbids downloads. Download it "
            "elsewhere and pass the local folder or file instead, or unset HF_HUB_OFFLINE."
        )


__all__ = [
    "CNNGemmaPreTrainedModel",
    "CNNGemmaModel",
    "CNNGemmaForConditionalGeneration",
    "CNNGemmaMultiModalProjector",
]
