"""Caption images with a saved or Hub CNNGemma model.

    python caption.py --model outputs/cnngemma-demo image1.jpg folder/ --format jsonl

Unreadable images get an error line naming the file; the rest are captioned and the exit code is 1 at the end.
Folders are searched for image files; other files there are skipped and counted. Images are decoded by
`load_image`, as in training. `--quantize int8` decodes faster on CPU, with captions that may differ (`quantize_int8`);
`--compile` runs transformers' compiled static-cache decoding, with the same captions (`compiled_generation`).
"""

import argparse
import json
import os
import sys
from pathlib import Path

from PIL.Image import DecompressionBombError

from cnngemma.errors import RunError, first_line, path_type, run_command
from cnngemma.inference import (
    check_generation_length,
    check_model_source,
    compiled_generation,
    load_model,
    quantize_int8,
)
from modeling_cnngemma import load_image

# What Pillow and tifffile raise for files that are not readable images; none of them stops the other images.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, ImportError, DecompressionBombError)
LINE_BREAKS = set("\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")  # besides \n and \r, for str.splitlines
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="caption.py", description="Caption aerial images with a CNNGemma model.")
    parser.add_argument(
        "inputs", nargs="+", type=path_type, help="Image files and/or folders (searched recursively for images)."
    )
    parser.add_argument(
        "--model",
        required=True,
        type=path_type,
        help="A folder written by train_hf.py / save_pretrained, or a Hub id.",
    )
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) to pin.")
    parser.add_argument("--prompt", default=None, help="Prompt before the caption (default: the model's prefix).")
    parser.add_argument("--batch-size", type=int, default=16, help="Images per generate() call.")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="Longest caption, in tokens.")
    parser.add_argument("--num-beams", type=int, default=1, help="Beam width; 1 is greedy decoding.")
    parser.add_argument(
        "--format",
        choices=("text", "jsonl"),
        default="text",
        help="text: 'path<TAB>caption' lines, with backslash, tab and newline escaped as \\\\, \\t and \\n.",
    )
    parser.add_argument(
        "--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: cuda if available; cpu with int8)."
    )
    parser.add_argument(
        "--nodata",
        type=float,
        help="Pixel value that marks missing data in images that do not declare one (e.g. 0 for Landsat's collars): "
        "left out of the 2-98 percentile stretch and shown black, as in dataset_builder build --nodata. A TIFF's own "
        "GDAL_NODATA and NaN always are.",
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
    if args.prompt is not None and "<image>" in args.prompt:
        parser.error(
            f"--prompt {args.prompt[:80]!r} contains <image>; the processor inserts the image tokens itself. Pass "
            "only the text, e.g. --prompt 'caption en'."
        )
    return args


def collect_images(inputs: list[str]) -> tuple[list[Path], list[str], list[Path], list[Path]]:
    """Image paths in the given order (folders sorted, recursive), error lines for inputs that do not exist or
    folders without images, the non-image files skipped in folders, and the symlinked sub-folders not searched
    (a link can point back up the tree)."""
    paths, errors, skipped, links = [], [], [], []
    for item in map(Path, inputs):
        if item.is_dir():
            files = []
            for root, dirs, names in os.walk(item):
                links += [Path(root, name) for name in dirs if Path(root, name).is_symlink()]
                files += [Path(root, name) for name in names if Path(root, name).is_file()]
            files.sort()
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
        elif item.exists():
            errors.append(f"error: {item}: not a regular file or folder (a FIFO or device?); pass an image file")
        else:
            errors.append(f"error: {item}: no such file or folder")
    return paths, errors, skipped, sorted(links)


def escape(text: str) -> str:
    """A field of a text line: a file name or caption holding a tab or a line break (any that str.splitlines
    knows) must not forge another record. Backslash, tab and newline become \\\\, \\t and \\n; other breaks \\x85, \\u2028, ..."""
    text = text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return "".join(c.encode("unicode_escape").decode() if c in LINE_BREAKS else c for c in text)


def summary(failed: int, captioned: int, skipped: list[Path], links: list[Path] = ()) -> str:
    parts = [f"{failed} input(s) failed"] if failed else []
    parts.append(f"{captioned} captioned")
    if skipped:
        suffixes = sorted({path.suffix.lower() or path.name for path in skipped})
        parts.append(f"{len(skipped)} non-image file(s) skipped ({', '.join(suffixes)})")
    if links:
        shown = ", ".join(map(str, links[:3])) + (f" and {len(links) - 3} more" if len(links) > 3 else "")
        parts.append(f"{len(links)} symlinked folder(s) not searched ({shown}): pass them as inputs to caption them")
    return "; ".join(parts) + "."


def caption_images(args) -> int:
    check_model_source(args.model)
    paths, errors, skipped, links = collect_images(args.inputs)
    for line in errors:
        print(line, file=sys.stderr)
    if not paths:
        print(summary(len(errors), 0, skipped, links), file=sys.stderr)
        return 1

    import torch
    from tqdm.auto import tqdm

    device = args.device or ("cuda" if torch.cuda.is_available() and args.quantize == "none" else "cpu")
    model, processor = load_model(args.model, revision=args.revision)
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError, ValueError) as error:  # torch: unknown device, or no CUDA in this build
        raise RunError(
            f"--device {device}: cannot use it ({type(error).__name__}: {first_line(error)}). Pass cpu, or cuda:N "
            "for a GPU that torch sees."
        ) from None
    check_generation_length(model, processor, args.max_new_tokens, args.prompt, flag="--max-new-tokens")
    if args.quantize == "int8":
        model = quantize_int8(model)
    generation = {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams, "do_sample": False}
    if args.compile:
        if not getattr(model, "_can_compile_fullgraph", False):
            raise RunError(
                f"--compile: the modeling code in {args.model} predates compiled decoding. Re-save the model with the "
                "current code (save_pretrained), or drop --compile."
            )
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
                # the training data's decoder: the same file gives the same pixels
                images.append(load_image(path, nodata=args.nodata))
                names.append(path)
                continue
            except IMAGE_ERRORS as error:
                problem = f"cannot read image ({type(error).__name__}: {first_line(error)})"
            except Exception as error:  # not a known bad-file error: said as such, and the other images go on
                problem = f"internal error while reading it ({type(error).__name__}: {first_line(error)})"
            errors.append(f"error: {path}: {problem}")
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
                    print(f"{escape(str(path))}\t{escape(caption)}")
            sys.stdout.flush()
        progress.update(len(paths[start : start + args.batch_size]))
    progress.close()
    if errors or skipped or links or show_progress:
        print(summary(len(errors), captioned, skipped, links), file=sys.stderr)
    return 1 if errors else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(lambda: caption_images(args))


if __name__ == "__main__":
    sys.exit(main())
