"""CNNGemma: PaliGemma's layout with a timm CNN as the vision tower, for cheap satellite and aerial captioning.

vision_tower (timm CNN) -> multi_modal_projector -> scattered into the `<image>` slots of a Gemma-family decoder.
"""

import copy
import os
from dataclasses import dataclass
from functools import lru_cache

import timm
import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, ModelOutput
from transformers.utils import logging

from .configuration_cnngemma import CNNGemmaConfig

logger = logging.get_logger(__name__)

IMAGE_TOKEN = "<image>"
# Fields of the text config that fix the shape of the decoder's weights; they must match a checkpoint's.
TEXT_SHAPE_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)


@dataclass
class CNNGemmaModelOutputWithPast(BaseModelOutputWithPast):
    """
    image_hidden_states (`torch.FloatTensor` of shape `(batch_size, num_image_tokens, hidden_size)`, *optional*):
        The projected image features that replaced the `<image>` tokens.
    """

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


@lru_cache(maxsize=64)
def _unused_children(vision_model_name: str, image_size: int) -> tuple[str, ...]:
    """Names of the timm model's top-level children that `forward_features` never calls.

    MobileNetV3 keeps its 960->1280 `conv_head` in the classification head, after pooling; CNNGemma reads the final
    feature map instead, so such modules would only be dead weights (and unused parameters break DDP).
    """
    with torch.device("meta"):
        model = timm.create_model(vision_model_name, pretrained=False, num_classes=0).eval()
    called = set()
    hooks = [
        child.register_forward_hook(lambda module, args, output, name=name: called.add(name))
        for name, child in model.named_children()
    ]
    model.forward_features(torch.empty(1, 3, image_size, image_size, device="meta"))
    for hook in hooks:
        hook.remove()
    return tuple(
        name for name, child in model.named_children() if name not in called and any(True for _ in child.parameters())
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


def _after_folding(norm: nn.Module) -> nn.Module:
    """What is left of a BatchNorm folded into its conv: timm's BatchNormAct2d keeps its activation (and its dropout,
    an Identity in eval mode unless drop_block is set); a plain BatchNorm2d leaves nothing."""
    drop, act = getattr(norm, "drop", nn.Identity()), getattr(norm, "act", nn.Identity())
    return act if isinstance(drop, nn.Identity) else nn.Sequential(drop, act)


def _foldable_tensors(tower: nn.Module) -> list[torch.Tensor] | None:
    """The tower's parameters and buffers when a folded copy may stand in for it, else None.

    That needs every module in eval mode (a BatchNorm in train mode normalises with batch statistics and updates
    its running ones), plain torch / timm modules (a peft adapter or another wrapper changes what a conv computes,
    and can be switched off at any time), no forward hooks or patched `forward` (accelerate's device hooks, feature
    capture: they would see the probe image and never the copy), and parameters at all (FSDP may flatten them
    away). Checked in full before a copy is built; `_tower_state` watches for changes on every call after that.
    """
    tensors = []
    for module in tower.modules():
        if module.training or module._forward_hooks or module._forward_pre_hooks or "forward" in vars(module):
            return None
        if type(module).__module__.split(".", 1)[0] not in ("torch", "timm"):
            return None
        tensors.extend(t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None)
    if not any(isinstance(t, nn.Parameter) for t in tensors):
        return None
    return tensors


def _tower_state(modules: list[nn.Module]) -> list | None:
    """What a folded copy of the tower depends on, read in one pass over its modules; None when one is in train mode
    or has hooks or a patched `forward`.

    The state lists which modules, parameters and buffers each module holds (a replaced child or weight changes it),
    each tensor's version counter (an optimizer step and load_state_dict bump it) and the data pointer of the first
    parameter (`.to()` on the tower alone gives every parameter new storage without bumping a counter). It runs on
    every inference call: comparing it with the state a copy was built from costs a fraction of the full check of
    `_foldable_tensors` (~0.3 against ~1.4 ms for MobileNetV3-L on the benchmark's CPU), which runs again only when
    the state differs.
    """
    children, tensors = [], []
    for attributes in map(vars, modules):  # instance dicts directly: attribute lookups add up here
        if attributes["training"] or attributes["_forward_hooks"] or attributes["_forward_pre_hooks"]:
            return None
        if "forward" in attributes:
            return None
        children += attributes["_modules"].values()
        tensors += attributes["_parameters"].values()  # None where a module has no bias
        tensors += attributes["_buffers"].values()
    first = next((t for t in tensors if isinstance(t, nn.Parameter)), None)
    versions = [t._version for t in tensors if t is not None]
    return [*map(id, children), *map(id, tensors), *versions, first.data_ptr() if first is not None else None]


@dataclass
class _FoldedTower:
    """A BatchNorm-folded inference copy of the vision tower and what it was built from."""

    modules: list[nn.Module]  # the tower's modules and tensors at build time, kept alive so that no id in
    tensors: list[torch.Tensor]  # `state` can be reused by a new object, nor a data pointer by a new tensor
    state: list
    folded: nn.Module


def _fold_tolerance(reference: torch.Tensor) -> float:
    """How far a folded tower's output may stray, relative to the features' size; a wrong fold is off by the size
    itself. Measured: fp32 folding ~2e-6 on CPU; on an H200, cuDNN's TF32 convolutions (on by default) ~1e-3."""
    if reference.dtype == torch.float64:
        return 1e-6
    if reference.dtype == torch.float32:
        return 1e-2 if reference.is_cuda and torch.backends.cudnn.allow_tf32 else 1e-3
    return 5e-2  # half precision


def fold_batchnorm(tower: nn.Module, example: torch.Tensor) -> tuple[nn.Module, int]:
    """An inference copy of `tower` with every eval-mode BatchNorm folded into the conv that feeds it.

    BN(conv(x)) = conv(x) * s + t with s = gamma / sqrt(var + eps) and t = beta - mean * s, so the conv's weights
    become W * s and its bias b * s + t, and the BatchNorm's pass over the activations disappears. Pairs are found
    on a forward pass over `example`: a BatchNorm whose input is the very tensor a Conv2d returned. The copy is
    checked against the tower on `example`; returns (copy, number of folded pairs), or (tower, 0) when the check
    fails.
    """
    conv_outputs, pairs, hooks = {}, [], []
    for name, module in tower.named_modules():
        if type(module) is nn.Conv2d:
            hooks.append(
                module.register_forward_hook(
                    lambda module, args, output, name=name: conv_outputs.__setitem__(id(output), (name, output))
                )
            )
        elif type(module) in (nn.BatchNorm2d, timm.layers.BatchNormAct2d) and module.track_running_stats:
            hooks.append(
                module.register_forward_pre_hook(
                    lambda module, args, name=name: pairs.append((conv_outputs.get(id(args[0]), (None,))[0], name))
                )
            )
    try:
        with torch.no_grad():
            reference = tower.forward_features(example)  # the hooks hold every conv output, so no id is reused
    finally:
        for hook in hooks:
            hook.remove()

    folded = copy.deepcopy(tower)
    modules = dict(folded.named_modules())
    count = 0
    with torch.no_grad():
        for conv_name, norm_name in pairs:
            if conv_name is None:
                continue
            conv, norm = modules[conv_name], modules[norm_name]
            # at least float32 (half weights are folded in float32), float64 where the weights are
            exact = torch.promote_types(conv.weight.dtype, torch.float32)
            scale = torch.rsqrt(norm.running_var.to(exact) + norm.eps)
            if norm.affine:
                scale = norm.weight.to(exact) * scale
            shift = -norm.running_mean.to(exact) * scale + (norm.bias.to(exact) if norm.affine else 0.0)
            bias = shift if conv.bias is None else conv.bias.to(exact) * scale + shift
            conv.weight.copy_(conv.weight.to(exact) * scale.view(-1, 1, 1, 1))
            conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
            parent_name, _, child_name = norm_name.rpartition(".")
            setattr(modules[parent_name] if parent_name else folded, child_name, _after_folding(norm))
            count += 1
        folded.requires_grad_(False)
        # a conv output that something besides its BatchNorm also reads cannot be folded: the check catches it
        difference = (folded.forward_features(example) - reference).abs().max().item()
    tolerance = _fold_tolerance(reference) * reference.abs().max().item()
    if not difference <= tolerance:
        logger.warning(
            f"Folding BatchNorm into the convs of {type(tower).__name__} changed its output by {difference:.3g} "
            f"(tolerance {tolerance:.3g}); running it unfolded. Set vision_fold_batchnorm=False to skip the attempt."
        )
        return tower, 0
    return folded, count


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
    _can_compile_fullgraph = False

    def save_pretrained(self, save_directory, *args, **kwargs):
        # Every auto_map entry must point into the folder being written. A config loaded from the Hub carries
        # "owner/repo--module.Class" entries, which would tie this copy to that repo's future code.
        self.config.auto_map = {
            "AutoConfig": "configuration_cnngemma.CNNGemmaConfig",
            "AutoModel": "modeling_cnngemma.CNNGemmaModel",
            "AutoModelForImageTextToText": "modeling_cnngemma.CNNGemmaForConditionalGeneration",
        }
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, loading_info) with output_loading_info
        # Loading swaps in the checkpoint's NCHW tensors, undoing the channels_last conversion made in __init__.
        for module in model.modules():
            if isinstance(module, CNNGemmaModel):
                module.apply_vision_memory_format()
        return loaded


class CNNGemmaModel(CNNGemmaPreTrainedModel):
    """The timm CNN, the projector and the Gemma-family decoder, without a language-modelling head."""

    def __init__(self, config: CNNGemmaConfig):
        super().__init__(config)
        self.vision_tower = build_vision_tower(config)
        # timm already initialised the tower its own way; transformers' generic `_init_weights` would re-draw every
        # conv and reset the BatchNorm statistics, so post_init() is told to skip it.
        for module in self.vision_tower.modules():
            module._is_hf_initialized = True
        self.apply_vision_memory_format()
        self._folded_tower = None  # a _FoldedTower, see inference_vision_tower()
        # The tower is not a PreTrainedModel, so device_map="auto" must be told to keep it on one device.
        self._no_split_modules = [*self._no_split_modules, type(self.vision_tower).__name__]
        self.multi_modal_projector = CNNGemmaMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    @property
    def vision_memory_format(self) -> torch.memory_format:
        """channels_last when `config.vision_channels_last`, else the contiguous (NCHW) format."""
        return torch.channels_last if self.config.vision_channels_last else torch.contiguous_format

    def apply_vision_memory_format(self):
        """Puts the CNN's conv weights in the memory format `config.vision_channels_last` asks for."""
        self.vision_tower.to(memory_format=self.vision_memory_format)

    def inference_vision_tower(self) -> nn.Module:
        """The tower to run: its BatchNorm-folded copy where folding changes nothing, else the tower itself.

        Folding needs every module of the tower in eval mode, no gradient for its weights, and plain torch / timm
        modules without hooks (see `_foldable_tensors`). The copy is cached and rebuilt whenever a weight or buffer
        of the tower changes in place (an optimizer step, load_state_dict) or moves to another device or dtype.
        Writes through `.data` (`weight.data.mul_()`, `weight.data = ...`) bypass the version counters that tell:
        call `forget_folded_tower()` after them.
        """
        tower = self.vision_tower
        if not self.config.vision_fold_batchnorm or torch.compiler.is_compiling() or torch.jit.is_tracing():
            return tower
        cached = getattr(self, "_folded_tower", None)  # absent on models pickled before the attribute existed
        try:
            state = _tower_state(cached.modules if cached is not None else list(tower.modules()))
        except RuntimeError:  # weights created under inference_mode have no version counter to watch
            return tower
        if state is None:
            return tower
        grad_needed = torch.is_grad_enabled()
        if cached is not None and state == cached.state:
            if grad_needed and any(t.requires_grad for t in cached.tensors):
                return tower
            return cached.folded
        # first call, or the tower changed since the copy was built: the full check, then a new copy
        self._folded_tower = None
        modules = list(tower.modules())
        tensors = _foldable_tensors(tower)
        if tensors is None:  # a module a copy cannot stand in for (a peft adapter), or no parameters (FSDP):
            # remembered until the state changes, so such a tower pays for the full check once, not on every call
            # (its tensors are not kept alive: a reused id could only keep it unfolded, never run a stale copy)
            self._folded_tower = _FoldedTower(modules, [], _tower_state(modules), tower)
            return tower
        if (grad_needed and any(t.requires_grad for t in tensors)) or any(t.is_meta for t in tensors):
            return tower  # the tower trains, or its weights are offloaded: nothing to fold
        size, (dtype, device) = self.config.image_size, (tensors[0].dtype, tensors[0].device)
        with torch.inference_mode(False):  # the copy's weights must stay usable outside inference_mode
            generator = torch.Generator(device).manual_seed(0)  # leaves the global RNG (sampling) untouched
            example = torch.randn(1, 3, size, size, dtype=dtype, device=device, generator=generator)
            folded, _ = fold_batchnorm(tower, example.contiguous(memory_format=self.vision_memory_format))
        self._folded_tower = _FoldedTower(modules, tensors, _tower_state(modules), folded)
        return folded

    def forget_folded_tower(self):
        """Drops the cached BatchNorm-folded copy of the tower; the next inference call builds a new one."""
        self._folded_tower = None

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / .half() go through here: free the copy now rather than at the next inference call
        self.forget_folded_tower()
        return super()._apply(fn, *args, **kwargs)

    def get_image_features(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """Projected image features of shape (B, num_image_tokens, hidden_size)."""
        # channels_last: oneDNN / cuDNN convs run NHWC natively, NCHW pays layout conversions (benchmarks/). The
        # converted copy goes straight in, so the CNN frees it after its first conv; a local name here would keep it
        # (19 MB at batch 32) alive through the whole forward, and on CPU glibc page-faults that much more per call.
        dtype = next(self.vision_tower.parameters()).dtype
        feature_map = self.inference_vision_tower().forward_features(
            pixel_values.to(dtype=dtype, memory_format=self.vision_memory_format)
        )  # (B, C, H, W)
        if self.config.token_mode == "single":
            features = feature_map.mean(dim=(2, 3)).unsqueeze(1)  # (B, C, H, W) -> (B, 1, C)
        else:
            features = feature_map.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
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
        is_prefill = cache is None or cache.get_seq_length() == 0

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
        elif is_prefill and input_ids is not None and (input_ids == self.config.image_token_id).any():
            raise ValueError(
                "input_ids contain `<image>` placeholders but no pixel_values were given; pass the images that the "
                "processor built these inputs for."
            )

        # 3. positions count real tokens only, so a left-padded row sees the same positions as when alone
        if position_ids is None and attention_mask is not None and is_prefill:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

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

    # ------------------------------------------------------------------ freezing
    def _parts(self) -> dict[str, nn.Module]:
        return {
            "vision_tower": self.model.vision_tower,
            "multi_modal_projector": self.model.multi_modal_projector,
            "language_model": self.model.language_model,
        }

    def set_trainable(self, *, vision_tower: bool, multi_modal_projector: bool, language_model: bool):
        """Freezes or unfreezes each part. A frozen CNN is kept in eval mode so its BatchNorm statistics never move."""
        flags = {
            "vision_tower": vision_tower,
            "multi_modal_projector": multi_modal_projector,
            "language_model": language_model,
        }
        for name, module in self._parts().items():
            module.requires_grad_(flags[name])
        # lm_head is tied to the embeddings, which belong to the language model
        self.lm_head.requires_grad_(language_model)
        if not vision_tower:
            self.model.vision_tower.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        # A frozen BatchNorm still updates running statistics in train mode (shared/NOTES.md): keep it in eval.
        if mode and not any(p.requires_grad for p in self.model.vision_tower.parameters()):
            self.model.vision_tower.eval()
        return self

    # ------------------------------------------------------------------ pretrained parts
    @classmethod
    def from_backbones(
        cls,
        config: CNNGemmaConfig,
        language_model: str | os.PathLike | None = None,
        vision_pretrained: bool | str | os.PathLike = False,
        tokenizer=None,
    ):
        """Builds CNNGemma from pretrained parts and returns `(model, tokenizer)`.

        Args:
            config: the CNNGemma config. Its text config must have the checkpoint's shape.
            language_model: a Gemma causal-LM or PaliGemma checkpoint (local folder or Hub id). From a PaliGemma
                checkpoint only the `language_model` weights are taken. None keeps a randomly initialised decoder.
            vision_pretrained: False (timm init), True (timm's ImageNet weights from the Hub) or a weights file.
            tokenizer: used when `language_model` is None; otherwise the checkpoint's tokenizer is loaded.

        Every weight of the pretrained parts must load: missing or unexpected keys raise.
        """
        config = CNNGemmaConfig.from_dict(config.to_dict())  # never mutate the caller's config
        lm_weights = None
        if language_model is not None:
            _check_reachable(language_model, "language_model")
            tokenizer = AutoTokenizer.from_pretrained(language_model)
            lm_weights, lm_config = _load_language_model(language_model)
            mismatched = [
                f"{field}: config {getattr(config.text_config, field, None)!r} != checkpoint "
                f"{getattr(lm_config, field, None)!r}"
                for field in TEXT_SHAPE_FIELDS
                if getattr(config.text_config, field, None) != getattr(lm_config, field, None)
            ]
            if mismatched:
                raise ValueError(
                    f"The config's text_config does not match the checkpoint {str(language_model)!r}: "
                    + "; ".join(mismatched)
                    + ". Use a config whose text_config is the checkpoint's (e.g. configuration/*.json for Gemma-2B)."
                )
            config.text_config = lm_config
        if tokenizer is not None:
            if IMAGE_TOKEN not in tokenizer.get_vocab():
                tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
                logger.info(
                    f"Added {IMAGE_TOKEN} to the tokenizer as id {tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}."
                )
            config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
            for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
                token_id = getattr(tokenizer, name)
                if token_id is not None:
                    setattr(config.text_config, name, token_id)

        if lm_weights is not None:
            # build with the checkpoint's vocabulary so its weights load as they are; resize for <image> afterwards
            config.text_config.vocab_size = lm_weights["embed_tokens.weight"].shape[0]
        model = cls(config)

        if vision_pretrained:
            if vision_pretrained is not True:
                _check_reachable(vision_pretrained, "vision_pretrained", must_be_local=True)
            else:
                _check_reachable(f"timm/{config.vision_model_name}", "vision_pretrained")
            try:
                pretrained_tower = build_vision_tower(config, pretrained=vision_pretrained)
            except RuntimeError as error:  # timm loads strictly; keep the head of torch's long key listing
                detail = " ".join(line.strip() for line in str(error).splitlines()[:2])[:400]
                raise ValueError(
                    f"vision_pretrained={str(vision_pretrained)!r} does not fit {config.vision_model_name!r}: "
                    f"{detail} Pass the weights of the architecture that vision_model_name names."
                ) from error
            _load_strict(model.model.vision_tower, pretrained_tower.state_dict(), "vision tower")
        if lm_weights is not None:
            _load_strict(model.model.language_model, lm_weights, "language model")
            model.tie_weights()
        if tokenizer is not None and len(tokenizer) > model.config.text_config.vocab_size:
            old = model.config.text_config.vocab_size
            model.resize_token_embeddings(len(tokenizer))
            logger.warning(f"Resized the token embeddings from {old} to {len(tokenizer)} to fit {IMAGE_TOKEN}.")
        if tokenizer is not None and model.config.image_token_id != tokenizer.convert_tokens_to_ids(IMAGE_TOKEN):
            raise ValueError(
                f"config.image_token_id={model.config.image_token_id} but the tokenizer's {IMAGE_TOKEN} id is "
                f"{tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}; they must be the same token."
            )
        return model, tokenizer


def _check_reachable(path_or_id, argument: str, must_be_local: bool = False):
    """Fails fast, and says what to do, when a path is missing or a Hub id cannot be fetched offline."""
    text = str(path_or_id)
    if os.path.exists(text):
        return
    looks_local = must_be_local or text.startswith((".", "/", "~")) or os.sep + os.sep in text or text.count("/") > 1
    if looks_local:
        raise FileNotFoundError(f"{argument}={text!r}: no such file or folder. Check the path.")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    if offline:
        raise OSError(
            f"{argument}={text!r} looks like a Hub id, but HF_HUB_OFFLINE=1 forbids downloads. Download it "
            "elsewhere and pass the local folder or file instead, or unset HF_HUB_OFFLINE."
        )


def _load_language_model(path_or_id) -> tuple[dict[str, torch.Tensor], object]:
    """The decoder's weights (GemmaModel keys) and text config, from a Gemma or a PaliGemma checkpoint."""
    from transformers import AutoConfig

    checkpoint_config = AutoConfig.from_pretrained(path_or_id)
    if checkpoint_config.model_type == "paligemma":
        from transformers import PaliGemmaForConditionalGeneration

        full = PaliGemmaForConditionalGeneration.from_pretrained(path_or_id, dtype=torch.float32)
        return full.model.language_model.state_dict(), checkpoint_config.text_config
    causal_lm = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=torch.float32)
    return causal_lm.model.state_dict(), checkpoint_config.get_text_config()


def _load_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], what: str):
    result = module.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"The pretrained {what} does not fit: missing keys {result.missing_keys[:10]} "
            f"({len(result.missing_keys)} in all), unexpected keys {result.unexpected_keys[:10]} "
            f"({len(result.unexpected_keys)} in all). Check that the checkpoint is the architecture the config names."
        )


__all__ = [
    "CNNGemmaPreTrainedModel",
    "CNNGemmaModel",
    "CNNGemmaForConditionalGeneration",
    "CNNGemmaMultiModalProjector",
]
