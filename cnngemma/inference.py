"""Loading a trained CNNGemma for inference, and the opt-in decoding paths, for caption.py, app.py, metrics and
benchmarks: a folder is checked before `from_pretrained`, every weight must load, the processor must fit the model,
and the folder must not change while it is read (`cnngemma.saving`)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForImageTextToText, AutoProcessor, CompileConfig, PreTrainedTokenizerFast

from modeling_cnngemma import (
    CNNGemmaForConditionalGeneration,
    CNNGemmaImageProcessor,
    CNNGemmaProcessor,
    check_source,
)

from . import adapters
from .errors import RunError, UsageError, first_line
from .int8 import quantize_int8
from .saving import SAVE_ID, mixed_saves, save_ids

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
MODEL_FOLDER = "a folder written by train_hf.py or save_pretrained"
# What a damaged or mismatched folder raises inside from_pretrained: missing or unreadable files (OSError), bad JSON
# or config values (ValueError), tensors of the wrong shape (RuntimeError), truncated safetensors (SafetensorError),
# a corrupt tokenizer.json (the tokenizers library raises plain Exception, caught by its message below).
LOAD_ERRORS = (OSError, ValueError, RuntimeError, TypeError, KeyError, SafetensorError)


def auto_map_modules(data: dict) -> list[str]:
    """The module files that a config's auto_map entries name (`processor_config.json` nests a second map)."""
    names = []
    for auto_map in (data.get("auto_map") or {}, (data.get("image_processor") or {}).get("auto_map") or {}):
        for reference in auto_map.values():
            for item in reference if isinstance(reference, list) else [reference]:  # AutoTokenizer: [slow, fast]
                if item and "--" not in item:  # "owner/repo--module.Class" lives in another Hub repository
                    names.append(f"{item.rsplit('.', 1)[0]}.py")
    return names


def check_model_folder(model: str, flag: str = "--model") -> None:
    """Names every file that `from_pretrained` would miss, before it fails with a message about Hub ids or
    sentencepiece. An adapter folder (peft) is recognised as one."""
    folder = Path(model)
    if folder.is_file():
        raise RunError(
            f"{flag} {model} is a file; pass the folder that holds config.json (e.g. {flag} {folder.parent})."
        )
    if adapters.is_adapter_folder(folder):  # loaded onto its base by cnngemma.adapters
        return
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        raise RunError(
            f"{flag} {model} holds a LoRA adapter (adapter_config.json) without its base model's weights. Merge it "
            "first (push_to_hub.py --merge_lora --dry_run DIR), or pass the merged folder."
        )
    if not (folder / "config.json").is_file():
        nested = sorted(path.parent for path in folder.glob("*/config.json"))
        hint = f" It has one in {nested[0]}: pass that folder." if nested else ""
        raise RunError(f"{flag} {model}: no config.json. Expected {MODEL_FOLDER}.{hint}")
    configs = {}
    for name in ("config.json", "processor_config.json"):
        try:
            configs[name] = (
                json.loads((folder / name).read_text(encoding="utf-8")) if (folder / name).is_file() else {}
            )
        except (ValueError, OSError) as error:
            raise RunError(f"{flag} {model}: {name} is not readable JSON ({error}). Re-save the model.") from None
    missing = [] if any((folder / name).is_file() for name in WEIGHT_FILES) else ["the weights (model.safetensors)"]
    missing += [name for name in ("tokenizer_config.json", "processor_config.json") if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        missing.append("tokenizer.json")
    modules = auto_map_modules(configs["config.json"]) + auto_map_modules(configs["processor_config.json"])
    missing += [name for name in dict.fromkeys(modules) if not (folder / name).is_file()]
    if missing:
        adapter = " It holds a LoRA adapter: merge it first (push_to_hub.py --merge_lora --dry_run DIR)."
        raise RunError(
            f"{flag} {model}: missing {', '.join(missing)}. Expected {MODEL_FOLDER}; re-save it, or copy the "
            f"missing files from the training output.{adapter if (folder / 'adapter_config.json').is_file() else ''}"
        )


def check_model_source(source: str, flag: str = "--model"):
    """A missing local path, a Hub id while offline, or a folder missing files: one RunError line, before loading."""
    try:
        check_source(source, flag)
    except OSError as error:
        raise RunError(str(error)) from None
    if Path(source).exists():
        check_model_folder(source, flag)


def load_model(
    source: str,
    *,
    revision: str | None = None,
    remote_code: bool = True,
    dtype=None,
    flag: str = "--model",
    adapter_base: str = "trained",
    device: str = "cpu",
):
    """The model (eval mode, on CPU) and its processor from a folder or a Hub id; every failure is one RunError line.

    `remote_code=False` builds both with this repository's classes instead of the folder's code (training code must
    be the code that saves). A local folder is read twice if a writer replaced it meanwhile; files from two saves are
    refused. An adapter folder (`cnngemma.adapters`) is rebuilt on its base, which `adapter_base` puts in 4-bit
    ('4bit', on `device`), full precision with the adapters merged ('full'), or as it trained ('trained')."""
    if adapters.is_adapter_folder(source):
        check_source(source, flag)
        four_bit = {"trained": None, "4bit": True, "full": False}[adapter_base]
        return adapters.load_adapter(source, load_in_4bit=four_bit, device=device, flag=flag)
    check_model_source(source, flag)
    local = Path(source).exists()
    for attempt in range(2):
        before = read_save_ids(source, flag) if local else {}
        if (mixed := mixed_saves(before)) is None:
            model, processor = _from_pretrained(source, revision, remote_code, dtype, flag)
            if not local or read_save_ids(source, flag) == before:
                break
            mixed = "it was replaced while being read"
        if attempt == 0:
            time.sleep(1.0)  # a writer renames its files within milliseconds; one retry sees its finished save
            continue
        raise RunError(
            f"{flag} {source}: its files come from different saves ({mixed}): a save into it is under way or was "
            "interrupted. Wait for the writer to finish and retry; after an interruption, re-save the model."
        )
    if hasattr(model.config, SAVE_ID):
        del model.config.save_id  # a stale id must not travel into the next save of this model
    check_processor_fits(model, processor, source, flag)
    return model.eval(), processor


def read_save_ids(source: str, flag: str) -> dict:
    try:
        return save_ids(Path(source))
    except (OSError, ValueError) as error:
        raise RunError(
            f"{flag} {source}: cannot load it ({type(error).__name__}: {first_line(error)}). {_fix(source)}"
        ) from None


def _from_pretrained(source, revision, remote_code, dtype, flag):
    # mismatched shapes are listed in the loading info (and refused below, by name) instead of a RuntimeError that
    # points at a report logged above it
    kwargs = {"revision": revision, "output_loading_info": True, "ignore_mismatched_sizes": True}
    kwargs |= {"dtype": dtype} if dtype is not None else {}
    try:
        if remote_code:
            model, info = AutoModelForImageTextToText.from_pretrained(source, trust_remote_code=True, **kwargs)
            processor = AutoProcessor.from_pretrained(source, revision=revision, trust_remote_code=True)
        else:
            model, info = CNNGemmaForConditionalGeneration.from_pretrained(source, **kwargs)
            processor = repo_processor(source, model.config, revision)
    except LOAD_ERRORS as error:
        raise RunError(
            f"{flag} {source}: cannot load it ({type(error).__name__}: {first_line(error)}). {_fix(source)}"
        ) from None
    except Exception as error:  # the tokenizers library raises bare Exception for a corrupt tokenizer.json
        if type(error) is not Exception:
            raise
        raise RunError(f"{flag} {source}: cannot load its tokenizer ({first_line(error)}). {_fix(source)}") from None
    found = {
        "missing": sorted(map(str, info["missing_keys"])),
        "unexpected": sorted(map(str, info["unexpected_keys"])),
        "wrongly shaped": [
            f"{key} {tuple(saved)}, config {tuple(needed)}" for key, saved, needed in info["mismatched_keys"]
        ],
    }
    problems = [
        f"{len(keys)} {kind} weight(s) ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})"
        for kind, keys in found.items()
        if keys
    ]
    if problems:
        raise RunError(
            f"{flag} {source}: the weights do not fit its config: {'; '.join(problems)}. A model with such layers "
            f"would caption with random weights. {_fix(source)}"
        )
    return model, processor


def repo_processor(source, config, revision: str | None = None) -> CNNGemmaProcessor:
    """The processor of a folder, built with this repository's classes (AutoTokenizer would read the folder's auto_map
    and ask to run its remote code)."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(source, revision=revision)
    image_processor = CNNGemmaImageProcessor.from_pretrained(source, revision=revision)
    return CNNGemmaProcessor(image_processor, tokenizer, config.num_image_tokens, config.prompt_prefix)


def _fix(source: str) -> str:
    if Path(source).exists():
        return f"Expected {MODEL_FOLDER}; re-save it."
    return "Check the Hub id, --revision and network access, or pass a local model folder."


def check_processor_fits(model, processor, source: str, flag: str = "--model"):
    """The processor must give the model the image tokens and the image size it was built for: a mismatch fails
    later inside generate with a message about tensors."""
    config = model.config
    image_processor = getattr(processor, "image_processor", None)
    size = getattr(image_processor, "size", None) or {}
    problems = []
    if getattr(processor, "num_image_tokens", config.num_image_tokens) != config.num_image_tokens:
        problems.append(f"num_image_tokens {processor.num_image_tokens} (the model has {config.num_image_tokens})")
    if size and (size.get("height"), size.get("width")) != (config.image_size, config.image_size):
        problems.append(f"image size {size.get('height')}x{size.get('width')} (the model takes {config.image_size})")
    if problems:
        raise RunError(
            f"{flag} {source}: processor_config.json does not fit the model: {'; '.join(problems)}. Re-save the "
            "processor with the model (train_hf.py does both), or copy processor_config.json from the training output."
        )


def prompt_length(processor, prompt: str | None = None) -> int:
    """Tokens before the caption: the image tokens, <bos> and the prompt with its newline."""
    text = processor.prompt_prefix if prompt is None else prompt
    prompt_ids = processor.tokenizer(text + "\n", add_special_tokens=False)["input_ids"]
    return processor.num_image_tokens + 1 + len(prompt_ids)


def generation_room(model, processor, prompt: str | None = None) -> int:
    """The most new tokens the decoder's positions hold after the prompt."""
    return model.config.text_config.max_position_embeddings - prompt_length(processor, prompt)


def check_generation_length(model, processor, max_new_tokens: int, prompt: str | None = None, flag="--max_new_tokens"):
    """Refuses a caption length the decoder's positions cannot hold (it would decode for minutes past them)."""
    positions = model.config.text_config.max_position_embeddings
    used = positions - generation_room(model, processor, prompt)
    if used >= positions:
        raise UsageError(
            f"--prompt of {len(prompt or '')} characters does not fit: with the {processor.num_image_tokens} image "
            f"tokens and <bos> it takes {used} of the decoder's {positions} positions, leaving none for the caption. "
            "Pass a shorter --prompt."
        )
    if used + max_new_tokens > positions:
        raise UsageError(
            f"{flag} {max_new_tokens} does not fit: the decoder has {positions} positions and the prompt takes {used} "
            f"({processor.num_image_tokens} image tokens, <bos> and the prompt). Pass {flag} {positions - used} or "
            "less, or a shorter prompt."
        )


def check_prompt(prompt: str | None, flag: str = "--prompt"):
    if prompt is not None and "<image>" in prompt:
        raise UsageError(
            f"{flag} {prompt[:80]!r} contains <image>; the processor inserts the image tokens itself. Pass only the "
            "text, e.g. 'caption en'."
        )


def prepare_for_captioning(
    source: str,
    *,
    revision: str | None,
    device: str,
    quantize: str,
    compile: bool,
    max_new_tokens: int,
    num_beams: int,
    prompt: str | None,
    adapter_base: str = "trained",
):
    """The model on `device`, its processor and the `generate` arguments for caption.py's flags (images and scenes):
    checked against the decoder's length, then int8 or compiled as asked. Each failure is one RunError line."""
    model, processor = load_model(source, revision=revision, adapter_base=adapter_base, device=device)
    if getattr(model, "is_loaded_in_4bit", False) and (quantize == "int8" or compile):
        raise RunError(
            f"{'--quantize int8' if quantize == 'int8' else '--compile'} needs the base decoder in full precision, but "
            f"{source} loads it in 4-bit. Add --adapter-base full (the adapters merged into the base)."
        )
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError, ValueError) as error:  # torch: unknown device, or no CUDA in this build
        raise RunError(
            f"--device {device}: cannot use it ({type(error).__name__}: {first_line(error)}). Pass cpu, or cuda:N "
            "for a GPU that torch sees."
        ) from None
    check_generation_length(model, processor, max_new_tokens, prompt, flag="--max-new-tokens")
    if quantize == "int8":
        model = quantize_int8(model)
    generation = {"max_new_tokens": max_new_tokens, "num_beams": num_beams, "do_sample": False}
    if compile:
        if not getattr(model, "_can_compile_fullgraph", False):
            raise RunError(
                f"--compile: the modeling code in {source} predates compiled decoding. Re-save the model with the "
                "current code (save_pretrained), or drop --compile."
            )
        generation |= compiled_generation(device=device)
    return model, processor, generation


def caption_batch(model, processor, images, prompt, generation: dict, device, fixed_batch: int = 0) -> list[str]:
    """Captions for a batch of RGB images, padded with copies of the last to `fixed_batch` (the compiled path keeps
    one graph per batch size)."""
    padding = images[-1:] * (fixed_batch - len(images)) if fixed_batch else []
    inputs = processor(images=images + padding, text=prompt).to(device)
    with torch.inference_mode():
        generated = model.generate(**inputs, **generation)[: len(images)]
    return processor.post_process_image_text_to_text(generated, input_ids=inputs["input_ids"][: len(images)])


def compiled_generation(backend: str = "inductor", device: str | torch.device = "cpu") -> dict:
    """`generate` arguments for the compiled path: a static KV cache, and decode steps that transformers compiles
    whole (`fullgraph=True`) on any device. The prefill, where the CNN runs, stays eager."""
    if backend == "inductor" and torch.device(device).type == "cpu":
        # Inductor's C++ wrapper calls the step's kernels without a Python function around them: on the trained
        # real model with --quantize int8 (2 CPU cores, 9 interleaved rounds) 22.0 ms per new token against 29.5,
        # for a first compile of 71 s against 54 s (inductor caches it for later runs). Elsewhere transformers'
        # default, CUDA graphs ("reduce-overhead"), which cannot be combined with options.
        config = CompileConfig(fullgraph=True, backend=backend, mode=None, options={"cpp_wrapper": True})
    else:
        config = CompileConfig(fullgraph=True, backend=backend)
    # transformers 5.24 auto-compiles on accelerators only unless this private flag is set (GenerationMixin.
    # _valid_auto_compile_criteria); tests/test_generation.py fails if a new version stops honouring it
    config._compile_all_devices = True
    return {"cache_implementation": "static", "compile_config": config}
