"""Caption images with a saved or Hub CNNGemma model.

    python caption.py --model outputs/cnngemma-demo image1.jpg folder/ --format jsonl

Unreadable images get an error line naming the file; the rest are captioned and the exit code is 1 at the end.
"""

import argparse
import json
import sys
from pathlib import Path

from modeling_cnngemma import check_source

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Caption aerial images with a CNNGemma model.")
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
        "--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: cuda if available)."
    )
    args = parser.parse_args(argv)
    for name in ("batch_size", "max_new_tokens", "num_beams"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    return args


def collect_images(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Image paths in the given order (folders sorted, recursive) and error lines for inputs that do not exist."""
    paths, errors = [], []
    for item in map(Path, inputs):
        if item.is_dir():
            paths.extend(sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))
        elif item.is_file():
            paths.append(item)
        else:
            errors.append(f"error: {item}: no such file or folder")
    return paths, errors


def load(model_name: str, revision: str | None, device: str):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_name, revision=revision, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(model_name, revision=revision, trust_remote_code=True)
    return model.to(device).eval(), processor


def open_image(path: Path):
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return image.copy()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_source(args.model, "--model")
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    import torch
    from tqdm.auto import tqdm

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    paths, errors = collect_images(args.inputs)
    for line in errors:
        print(line, file=sys.stderr)
    model, processor = load(args.model, args.revision, device)
    show_progress = any(Path(item).is_dir() for item in args.inputs)
    captioned = 0
    progress = tqdm(total=len(paths), desc="captioning", unit="img", disable=not show_progress, file=sys.stderr)
    for start in range(0, len(paths), args.batch_size):
        images, names = [], []
        for path in paths[start : start + args.batch_size]:
            try:
                images.append(open_image(path))
                names.append(path)
            except Exception as error:  # PIL raises several types for bad files; each is reported, none stops us
                errors.append(f"error: {path}: cannot read image ({type(error).__name__}: {error})")
                print(errors[-1], file=sys.stderr)
        if images:
            inputs = processor(images=images, text=args.prompt).to(device)
            with torch.inference_mode():
                generated = model.generate(
                    **inputs, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, do_sample=False
                )
            captions = processor.post_process_image_text_to_text(generated, input_ids=inputs["input_ids"])
            captioned += len(captions)
            for path, caption in zip(names, captions, strict=True):
                if args.format == "jsonl":
                    print(json.dumps({"image": str(path), "caption": caption}))
                else:
                    print(f"{path}\t{caption}")
            sys.stdout.flush()
        progress.update(len(paths[start : start + args.batch_size]))
    progress.close()
    if errors:
        print(f"{len(errors)} input(s) failed; {captioned} captioned.", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
