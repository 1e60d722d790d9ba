"""Caption images with a saved or Hub CNNGemma model.

    python caption.py --model outputs/cnngemma-demo image1.jpg folder/ --format jsonl

Unreadable images get an error line naming the file; the rest are captioned and the exit code is 1 at the end.
Folders are searched for image files; other files there are skipped and counted. Images are decoded by
`load_image`, as in training. `--quantize int8` decodes faster on CPU, with captions that may differ (`quantize_int8`);
`--compile` runs transformers' compiled static-cache decoding, with the same captions (`compiled_generation`).
"""

import argparse
import json
import sys
from pathlib import Path

from modeling_cnngemma import check_source, load_image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif"}
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
MODEL_FOLDER = "a folder written by train_hf.py or save_pretrained"


class ModelError(Exception):
    """The model cannot be used; the message is one line saying what to pass instead."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="caption.py", description="Caption aerial images with a CNNGemma model.")
    parser.add_argument("inputs", nargs="+", help="Image files and/or folders (searched recursively for images).")
    parser.add_argument(
        "--model", required=True, help="A folder written by train_hf.py / save_pretrained, or a Hub id."
    )
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) to pin.")
    parser.add_argument("--prompt", default=None, help="Prompt before the caption (default: the model's prefix).")
    parser.add_argument("--batch-size", type=int, default=16, help="Images per generate() call.")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="Longest caption, in tokens.")
    parser.add_argument("--num-beams", type=int, default=1, help="Beam width; 1 is greedy decoding.")
    parser.add_argument("--format", choices=("text", "jsonl"), default="text", help="text: 'path<TAB>caption' lines.")
    parser.add_argument(
        "--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: cuda if available; cpu with int8)."
    )
    parser.add_argument(
        "--quantize",
        choices=("none", "int8"),
        default="none",
        help="int8: int8 weights in the decoder and its head, CPU only; faster, captions may differ (default: none).",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="Static KV cache and compiled decode steps: the same captions after a one-off compile (about a minute "
        "on CPU for the 270M decoder, then 3-12%% faster: benchmarks/README.md); greedy only.",
    )
    args = parser.parse_args(argv)
    for name in ("batch_size", "max_new_tokens", "num_beams"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    if args.quantize == "int8" and args.device is not None and not args.device.startswith("cpu"):
        parser.error(f"--quantize int8 runs on CPU only, got --device {args.device}. Pass --device cpu or drop it.")
    if args.compile and (args.quantize != "none" or args.num_beams > 1):
        parser.error("--compile goes with greedy fp32 decoding only; drop --quantize and --num-beams, or --compile.")
    return args


def auto_map_modules(data: dict) -> list[str]:
    """The module files that a config's auto_map entries name (`processor_config.json` nests a second map)."""
    names = []
    for auto_map in (data.get("auto_map") or {}, (data.get("image_processor") or {}).get("auto_map") or {}):
        for reference in auto_map.values():
            for item in reference if isinstance(reference, list) else [reference]:  # AutoTokenizer: [slow, fast]
                # "owner/repo--module.Class" lives in another Hub repository, not in this folder
                if item and "--" not in item:
                    names.append(f"{item.rsplit('.', 1)[0]}.py")
    return names


def check_model_folder(model: str) -> None:
    """Names every file that `from_pretrained` would miss, before it fails with a message about Hub ids or
    sentencepiece."""
    folder = Path(model)
    if folder.is_file():
        raise ModelError(
            f"--model {model} is a file; pass the folder that holds config.json (e.g. --model {folder.parent})."
        )
    if not (folder / "config.json").is_file():
        nested = sorted(path.parent for path in folder.glob("*/config.json"))
        hint = f" It has one in {nested[0]}: pass that folder." if nested else ""
        raise ModelError(f"--model {model}: no config.json. Expected {MODEL_FOLDER}.{hint}")
    configs = {}
    for name in ("config.json", "processor_config.json"):
        try:
            configs[name] = (
                json.loads((folder / name).read_text(encoding="utf-8")) if (folder / name).is_file() else {}
            )
        except (ValueError, OSError) as error:
            raise ModelError(f"--model {model}: {name} is not readable JSON ({error}). Re-save the model.") from None
    missing = [] if any((folder / name).is_file() for name in WEIGHT_FILES) else ["the weights (model.safetensors)"]
    missing += [name for name in ("tokenizer_config.json", "processor_config.json") if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        missing.append("tokenizer.json")
    modules = auto_map_modules(configs["config.json"]) + auto_map_modules(configs["processor_config.json"])
    missing += [name for name in dict.fromkeys(modules) if not (folder / name).is_file()]
    if missing:
        adapter = " It holds a LoRA adapter: merge it first (push_to_hub.py --merge_lora --dry_run DIR)."
        raise ModelError(
            f"--model {model}: missing {', '.join(missing)}. Expected {MODEL_FOLDER}; re-save it, or copy the "
            f"missing files from the training output.{adapter if (folder / 'adapter_config.json').is_file() else ''}"
        )


def collect_images(inputs: list[str]) -> tuple[list[Path], list[str], list[Path]]:
    """Image paths in the given order (folders sorted, recursive), error lines for inputs that do not exist or
    folders without images, and the non-image files skipped in folders."""
    paths, errors, skipped = [], [], []
    for item in map(Path, inputs):
        if item.is_dir():
            files = sorted(p for p in item.rglob("*") if p.is_file())
            images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
            if not images:
                found = f"only {len(files)} other file(s)" if files else "it is empty"
                errors.append(
                    f"error: {item}: no images in this folder ({found}). Expected files ending in "
                    f"{', '.join(sorted(IMAGE_SUFFIXES))}; pass a folder that holds images."
                )
            paths.extend(images)
            skipped.extend(p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES)
        elif item.is_file():
            paths.append(item)
        else:
            errors.append(f"error: {item}: no such file or folder")
    return paths, errors, skipped


def load(model_name: str, revision: str | None, device: str):
    """The model on `device` and its processor; any failure is one ModelError line."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        model = AutoModelForImageTextToText.from_pretrained(model_name, revision=revision, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(model_name, revision=revision, trust_remote_code=True)
    except Exception as error:  # transformers, safetensors, the network and remote code raise many types
        fix = (
            f"Expected {MODEL_FOLDER}; re-save it"
            if Path(model_name).exists()
            else "Check the Hub id, --revision and network access, or pass a local model folder"
        )
        raise ModelError(
            f"--model {model_name}: cannot load it ({type(error).__name__}: {first_line(error)}). {fix}."
        ) from None
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError, ValueError) as error:  # torch: unknown device, or no CUDA in this build
        raise ModelError(
            f"--device {device}: cannot use it ({type(error).__name__}: {first_line(error)}). Pass cpu, or cuda:N "
            "for a GPU that torch sees."
        ) from None
    return model.eval(), processor


def quantize_int8(model):
    """Int8 weights, per output channel, in the decoder's and the head's Linear layers, with activations quantized
    on the fly (torch's dynamic quantization); in place, CPU only, for inference, not for `save_pretrained`.

        model = quantize_int8(AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True))
    """
    import warnings

    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ModelError(
            f"quantize_int8: the model is on {device}, but int8 decoding runs on CPU only (torch's dynamic "
            "quantization has no kernels for other devices). Move it with model.cpu() first, or do not quantize."
        )
    # Dynamic int8 kernels take fp32 activations: a bf16 or fp16 checkpoint (from_pretrained keeps the saved dtype)
    # is widened first, which loses nothing.
    model.float()
    # The head gets its own int8 copy of the tied embedding matrix, the largest weight read at each step; the
    # input embeddings stay fp32.
    spec = {"model.language_model": per_channel_dynamic_qconfig, "lm_head": per_channel_dynamic_qconfig}
    with warnings.catch_warnings():
        # torch marks this API deprecated in favour of torchao, whose int8 path is slower than fp32 here without
        # torch.compile; the warnings are about its future, not about this model.
        warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="torch.quantize_per_tensor, torch.quantize_per_channel")
        return quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)


def compiled_generation(backend: str = "inductor") -> dict:
    """`generate` arguments for the compiled path: a static KV cache, and decode steps that transformers compiles
    whole (`fullgraph=True`) on any device. The prefill, where the CNN runs, stays eager."""
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True, backend=backend)
    # transformers 5.24 auto-compiles on accelerators only unless this private flag is set (GenerationMixin.
    # _valid_auto_compile_criteria); tests/test_generation.py fails if a new version stops honouring it
    config._compile_all_devices = True
    return {"cache_implementation": "static", "compile_config": config}


def first_line(error: Exception, limit: int = 300) -> str:
    text = (str(error).strip().splitlines() or [""])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def summary(failed: int, captioned: int, skipped: list[Path]) -> str:
    parts = [f"{failed} input(s) failed"] if failed else []
    parts.append(f"{captioned} captioned")
    if skipped:
        suffixes = sorted({path.suffix.lower() or path.name for path in skipped})
        parts.append(f"{len(skipped)} non-image file(s) skipped ({', '.join(suffixes)})")
    return "; ".join(parts) + "."


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_source(args.model, "--model")
        if Path(args.model).exists():
            check_model_folder(args.model)
    except (OSError, ModelError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    paths, errors, skipped = collect_images(args.inputs)
    for line in errors:
        print(line, file=sys.stderr)
    if not paths:
        print(summary(len(errors), 0, skipped), file=sys.stderr)
        return 1

    import torch
    from tqdm.auto import tqdm

    device = args.device or ("cuda" if torch.cuda.is_available() and args.quantize == "none" else "cpu")
    try:
        model, processor = load(args.model, args.revision, device)
        if args.quantize == "int8":
            model = quantize_int8(model)
    except ModelError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    generation = {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams, "do_sample": False}
    if args.compile:
        if not getattr(model, "_can_compile_fullgraph", False):
            print(
                f"error: --compile: the modeling code in {args.model} predates compiled decoding. Re-save the model "
                "with the current code (save_pretrained), or drop --compile.",
                file=sys.stderr,
            )
            return 1
        generation |= compiled_generation()
    # compiled decoding keeps one graph per batch size: the last, smaller batch is padded with copies of an image
    fixed_batch = min(args.batch_size, len(paths)) if args.compile else 0
    show_progress = any(Path(item).is_dir() for item in args.inputs)
    captioned = 0
    progress = tqdm(total=len(paths), desc="captioning", unit="img", disable=not show_progress, file=sys.stderr)
    for start in range(0, len(paths), args.batch_size):
        images, names = [], []
        for path in paths[start : start + args.batch_size]:
            try:
                images.append(load_image(path))  # the training data's decoder: the same file gives the same pixels
                names.append(path)
            except Exception as error:  # PIL and tifffile raise several types for bad files; none stops the rest
                errors.append(f"error: {path}: cannot read image ({type(error).__name__}: {first_line(error)})")
                progress.write(errors[-1], file=sys.stderr)  # above the progress bar, not through it
        if images:
            padding = images[-1:] * (fixed_batch - len(images)) if fixed_batch else []
            inputs = processor(images=images + padding, text=args.prompt).to(device)
            with torch.inference_mode():
                generated = model.generate(**inputs, **generation)[: len(images)]
            captions = processor.post_process_image_text_to_text(
                generated, input_ids=inputs["input_ids"][: len(images)]
            )
            captioned += len(captions)
            for path, caption in zip(names, captions, strict=True):
                if args.format == "jsonl":
                    print(json.dumps({"image": str(path), "caption": caption}))
                else:
                    print(f"{path}\t{caption}")
            sys.stdout.flush()
        progress.update(len(paths[start : start + args.batch_size]))
    progress.close()
    if errors or skipped or show_progress:
        print(summary(len(errors), captioned, skipped), file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
