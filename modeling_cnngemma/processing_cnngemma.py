"""CNNGemma processor: images -> pixel_values, prompt (+ caption) -> `<image>`*N `<bos>` prompt "\n" [caption `<eos>`].

Batches are left-padded so that generation continues every row from its last real token.
"""

import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ImagesKwargs, ProcessorMixin, TextKwargs

from .image_processing_cnngemma import CNNGemmaImageProcessor

IMAGE_TOKEN = "<image>"
# For `apply_chat_template` and pipeline("image-text-to-text") chats: the prompt is the text of the user turns; the
# processor places the image tokens itself, so the template only joins text.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages if message['role'] == 'user' -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
    "{%- for item in message['content'] if item['type'] == 'text' -%}{{ item['text'] }}{%- endfor -%}"
    "{%- endif -%}{%- endfor -%}"
)


class CNNGemmaProcessor(ProcessorMixin):
    r"""
    Builds CNNGemma inputs. For each image and prompt `text` (default: the config's prefix, "caption en"):

        input_ids = [<image>] * num_image_tokens + [<bos>] + tokens(text + "\n") [+ tokens(suffix) + [<eos>]]

    With a `suffix` (the caption to learn) it also returns `labels`: -100 everywhere except on the caption tokens
    and their `<eos>`.

    Args:
        image_processor (`CNNGemmaImageProcessor`), tokenizer (`PreTrainedTokenizerBase`): must know `<image>`.
        num_image_tokens (`int`): image tokens per image, `config.num_image_tokens`.
        prompt_prefix (`str`): the prompt used when `text` is None.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens: int = 1,
        prompt_prefix: str = "caption en",
        chat_template=None,
        **kwargs,
    ):
        self.num_image_tokens = int(num_image_tokens)
        self.prompt_prefix = prompt_prefix
        self.image_token = IMAGE_TOKEN
        super().__init__(image_processor, tokenizer, chat_template=chat_template or DEFAULT_CHAT_TEMPLATE)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(
                f"The tokenizer has no {IMAGE_TOKEN} token. Add it with "
                f"tokenizer.add_tokens([AddedToken('{IMAGE_TOKEN}', special=True)], special_tokens=True) "
                "and resize the model's embeddings, or build the model with cnngemma.backbones.from_backbones."
            )
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(tokenizer, name) is None:
                raise ValueError(f"The tokenizer has no {name[:-3]}; CNNGemma needs <bos>, <eos> and <pad> tokens.")

    @classmethod
    def from_model_config(cls, config, tokenizer) -> "CNNGemmaProcessor":
        """The processor matching a CNNGemmaConfig: its image size, normalisation (the config's, else timm's), token
        count and prefix."""
        image_processor = CNNGemmaImageProcessor.from_timm(config.vision_model_name, config.image_size)
        if getattr(config, "image_mean", None) is not None:
            image_processor.image_mean, image_processor.image_std = list(config.image_mean), list(config.image_std)
        processor = cls(
            image_processor,
            tokenizer,
            num_image_tokens=config.num_image_tokens,
            prompt_prefix=config.prompt_prefix,
        )
        if processor.image_token_id != config.image_token_id:
            raise ValueError(
                f"config.image_token_id={config.image_token_id} but the tokenizer's {IMAGE_TOKEN} id is "
                f"{processor.image_token_id}; build the config from this tokenizer."
            )
        return processor

    def __call__(self, images=None, text=None, suffix=None, return_tensors: str | None = "pt", **kwargs):
        """
        Args:
            images: one PIL image or a list of them (one per sample).
            text: the prompt: None (the config's prefix), one string for all images, or one per image.
            suffix: optional caption(s) to learn, one per image: adds `<eos>` and returns `labels`.
            return_tensors: "pt" (default) or None for lists.
            **kwargs: transformers' image kwargs (`size`, `do_resize`, `do_normalize`, ...) go to the image
                processor. Its text kwargs are accepted as pipelines pass them (`padding=True`), but rows are always
                left-padded to the longest and never truncated; asking for anything else raises.

        Returns:
            `BatchFeature` with exactly `input_ids`, `attention_mask`, `pixel_values` (+ `labels` with a suffix).
        """
        for modality in ("videos", "audio"):  # apply_chat_template passes them, None when the chat has none
            if kwargs.pop(modality, None) is not None:
                raise ValueError(f"CNNGemmaProcessor got {modality}; CNNGemma captions images only.")
        images_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key in ImagesKwargs.__annotations__}
        if unknown := sorted(set(kwargs) - set(TextKwargs.__annotations__)):
            raise ValueError(
                f"CNNGemmaProcessor got unknown keyword argument(s) {unknown}; expected images, text, suffix, "
                "return_tensors, or transformers' image or text processing kwargs. Generation options go to "
                "`generate` (in a pipeline: generate_kwargs={...})."
            )
        unsupported = {key: kwargs[key] for key in ("truncation", "max_length") if kwargs.get(key)}
        unsupported.update({k: v for k, v in kwargs.items() if k == "padding" and v not in (True, False, "longest")})
        unsupported.update({k: v for k, v in kwargs.items() if k == "padding_side" and v != "left"})
        if unsupported:
            raise ValueError(
                f"CNNGemmaProcessor does not support {unsupported}: rows are left-padded to the longest and never "
                "truncated (the `<image>` tokens must stay whole). Drop these arguments."
            )
        if images is None:
            raise ValueError("CNNGemmaProcessor needs images: one PIL image or a list with one image per sample.")
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if not images:
            raise ValueError("CNNGemmaProcessor got an empty list of images; pass at least one image, one per sample.")
        # apply_chat_template passes one list of images per conversation: CNNGemma takes exactly one per sample
        for i, image in enumerate(images):
            if isinstance(image, (list, tuple)):
                if len(image) != 1:
                    raise ValueError(f"images[{i}] holds {len(image)} images; CNNGemma takes one image per sample.")
                images[i] = image[0]
        prompts = self._per_image(text if text is not None else self.prompt_prefix, len(images), "text")
        for i, prompt in enumerate(prompts):
            if IMAGE_TOKEN in prompt:
                raise ValueError(
                    f"text[{i}]={prompt!r} contains {IMAGE_TOKEN}; the processor inserts the {self.num_image_tokens} "
                    f"{IMAGE_TOKEN} tokens itself. Pass only the prompt, e.g. {self.prompt_prefix!r}."
                )
        captions = None if suffix is None else self._per_image(suffix, len(images), "suffix", broadcast=False)

        tokenizer = self.tokenizer
        prefix_ids = [
            [self.image_token_id] * self.num_image_tokens + [tokenizer.bos_token_id] + ids
            for ids in tokenizer([p + "\n" for p in prompts], add_special_tokens=False)["input_ids"]
        ]
        if captions is None:
            sequences, labels = prefix_ids, None
        else:
            caption_ids = [
                ids + [tokenizer.eos_token_id] for ids in tokenizer(captions, add_special_tokens=False)["input_ids"]
            ]
            sequences = [p + c for p, c in zip(prefix_ids, caption_ids)]
            labels = [[-100] * len(p) + c for p, c in zip(prefix_ids, caption_ids)]

        # left padding: every row ends on its last real token, where generation continues
        length = max(len(s) for s in sequences)
        data = {
            "input_ids": [[tokenizer.pad_token_id] * (length - len(s)) + s for s in sequences],
            "attention_mask": [[0] * (length - len(s)) + [1] * len(s) for s in sequences],
        }
        if labels is not None:
            data["labels"] = [[-100] * (length - len(lab)) + lab for lab in labels]
        pixel_values = self.image_processor(images, return_tensors=return_tensors, **images_kwargs)["pixel_values"]
        if return_tensors == "pt":
            data = {key: torch.tensor(value, dtype=torch.long) for key, value in data.items()}
        elif return_tensors is not None:
            raise ValueError(f"return_tensors={return_tensors!r} is not supported; use 'pt' or None.")
        data["pixel_values"] = pixel_values
        # BatchFeature, not BatchEncoding: pipelines call `.to(dtype=...)`, which casts pixel_values only
        return BatchFeature(data)

    @staticmethod
    def _per_image(value, num_images: int, name: str, broadcast: bool = True) -> list[str]:
        if isinstance(value, str):
            if broadcast or num_images == 1:
                return [value] * num_images
            raise ValueError(f"Got one {name} string for {num_images} images; pass a list with one {name} per image.")
        value = list(value)
        if len(value) != num_images:
            raise ValueError(f"Got {len(value)} {name} entries for {num_images} images; pass one per image.")
        if not all(isinstance(v, str) for v in value):
            raise ValueError(f"Every {name} entry must be a string, got {[type(v).__name__ for v in value]}.")
        return value

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, input_ids=None, **kwargs):
        """Decodes `generate` outputs to captions: drops the prompt (by `input_ids` length, or up to its "\\n")."""
        if input_ids is not None:
            generated_outputs = generated_outputs[:, input_ids.shape[1] :]
        texts = self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)
        if input_ids is None:
            texts = [text.split("\n", 1)[1] if "\n" in text else text for text in texts]
        return [text.strip() for text in texts]

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values"]


__all__ = ["CNNGemmaProcessor"]
