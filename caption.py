"""Caption images with a saved or Hub CNNGemma model.

    python caption.py --model outputs/cnngemma-demo image1.jpg folder/ --format jsonl

Unreadable images get an error line naming the file; the rest are captioned and the exit code is 1 at the end.
Folders are searched for image files; other files there are skipped and counted. Images are decoded by
`load_image`, as in training. `--quantize int8` decodes faster on CPU, with captions that may differ
(`cnngemma.int8`); `--compile` runs transformers' compiled static-cache decoding (`compiled_generation`), with the
same captions in fp32, and goes with `--quantize int8` too.

Whole scenes (a georeferenced raster, or any raster with --tile) are captioned tile by tile into GeoJSON, resumably and
in shards (`cnngemma.scene_jobs`):

    python caption.py --model DIR scene.tif --output tiles.geojson
    python caption.py --model DIR --stack B04.jp2,B03.jp2,B02.jp2 --tile 224 --output tiles.geojson
    accelerate launch --num_processes 2 caption.py --model DIR scenes/ --output tiles.geojson
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path

from PIL.Image import DecompressionBombError

from cnngemma import adapters
from cnngemma.errors import RunError, UsageError, first_line, path_type, run_command
from cnngemma.inference import caption_batch, check_model_source, prepare_for_captioning
from modeling_cnngemma import load_image

# What Pillow and tifffile raise for files that are not readable images; none of them stops the other images.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, ImportError, DecompressionBombError)
LINE_BREAKS = set("\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")  # besides \n and \r, for str.splitlines
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="caption.py", description="Caption aerial images with a CNNGemma model.")
    parser.add_argument(
        "inputs", nargs="*", type=path_type, help="Image files and/or folders (searched recursively for images)."
    )
    parser.add_argument(
        "--model",
        type=path_type,
        help="A folder written by train_hf.py / save_pretrained, or a Hub id (required, except with --merge).",
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
    adapters.add_base_argument(parser, "--adapter-base")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="Static KV cache and compiled decode steps, greedy only. After a one-off compile (1.5-2 minutes per "
        "batch size on CPU for the 270M decoder, cached by inductor) a new token is 12%% faster in fp32, with the "
        "same captions, and 38%% with --quantize int8, where some captions differ (results/real/README.md).",
    )
    scenes = parser.add_argument_group(
        "scenes",
        "A georeferenced raster (GeoTIFF, COG, JPEG 2000, ...), or any input when --tile or --output is given, is "
        "cut into tiles and captioned into a GeoJSON FeatureCollection: one feature per tile with its footprint in "
        "WGS 84. A killed run resumes from OUTPUT.work when re-run with the same flags.",
    )
    scenes.add_argument("--output", type=path_type, help="The GeoJSON to write (e.g. tiles.geojson).")
    scenes.add_argument(
        "--tile",
        type=int,
        help="Tile side in scene pixels, resized to the model's input (default: the model's image size, so that a "
        "scene pixel is a model pixel).",
    )
    scenes.add_argument(
        "--overlap",
        type=int,
        default=0,
        help="Pixels shared by neighbouring tiles (default 0). Edge tiles shift inward to end at the scene's edge "
        "rather than being padded with black.",
    )
    scenes.add_argument(
        "--bands",
        help="The bands shown as R,G,B: 1-based numbers or names from the file's band descriptions, e.g. 4,3,2 or "
        "red,green,blue; one band is shown as grey (default: bands 1-3).",
    )
    scenes.add_argument(
        "--stretch",
        help="LOW,HIGH: map these values to 0 and 255 in every band, instead of the scene's 2-98 percentiles of valid"
        " pixels (one stretch per scene, never per tile).",
    )
    scenes.add_argument(
        "--max-nodata",
        type=float,
        default=0.5,
        help="Tiles with a larger share of invalid pixels (no-data, NaN, masked) are not captioned; they stay in the "
        "output with status 'nodata'.",
    )
    scenes.add_argument(
        "--stack",
        action="append",
        default=[],
        type=path_type,
        help="Single-band files of one grid stacked as bands of one scene, in R,G,B order: B04.jp2,B03.jp2,B02.jp2 "
        "(repeatable).",
    )
    scenes.add_argument(
        "--shard",
        help="I/N: run only shard I (0-based) of N, without a launcher (Slurm arrays, Kubernetes jobs); then run "
        "--merge. Under accelerate launch the processes are the shards.",
    )
    scenes.add_argument("--merge", action="store_true", help="Merge the finished shards in OUTPUT.work into --output.")
    scenes.add_argument(
        "--attribution",
        help="The imagery's credit line, printed on each scene's preview PNG (OUTPUT_STEM-preview-N-SCENE.png), e.g. "
        "'Contains modified Copernicus Sentinel data 2016'.",
    )
    args = parser.parse_args(argv)
    if args.merge:
        if args.output is None:
            parser.error("--merge needs --output, the GeoJSON whose shards to merge.")
        return args
    if args.model is None:
        parser.error("the following arguments are required: --model")
    if not args.inputs and not args.stack:
        parser.error("the following arguments are required: inputs (or --stack)")
    for name in ("batch_size", "max_new_tokens", "num_beams"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    if args.quantize == "int8" and args.device is not None and not args.device.startswith("cpu"):
        parser.error(f"--quantize int8 runs on CPU only, got --device {args.device}. Pass --device cpu or drop it.")
    if args.compile and args.num_beams > 1:
        parser.error(f"--compile goes with greedy decoding only, got --num-beams {args.num_beams}. Drop one of them.")
    if args.prompt is not None and "<image>" in args.prompt:
        parser.error(
            f"--prompt {args.prompt[:80]!r} contains <image>; the processor inserts the image tokens itself. Pass "
            "only the text, e.g. --prompt 'caption en'."
        )
    return args


def sorted_files(folder: Path, links: list[Path]):
    """The files under `folder`, streamed in sorted path order: each folder's entries sorted by name, a sub-folder
    walked where its name falls. Symlinked sub-folders are not entered (a link can point back up the tree): they
    are added to `links`."""
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError:  # unreadable: as os.walk, nothing from it
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from sorted_files(Path(entry.path), links)
        elif entry.is_dir():
            links.append(Path(entry.path))
        elif entry.is_file():
            yield Path(entry.path)


def collect_images(inputs: list[str], suffixes=IMAGE_SUFFIXES) -> tuple[list[Path], list[str], list[Path], list[Path]]:
    """Image paths in the given order (folders sorted, recursive), error lines for inputs that do not exist or
    folders without images, the non-image files skipped in folders, and the symlinked sub-folders not searched."""
    paths, errors, skipped, links = [], [], [], []
    for item in map(Path, inputs):
        if item.is_dir():
            images, others = [], 0
            for path in sorted_files(item, links):
                if path.suffix.lower() in suffixes:
                    images.append(path)
                else:
                    skipped.append(path)
                    others += 1
            if not images:
                found = f"only {others} other file(s)" if others else "it is empty"
                errors.append(
                    f"error: {item}: no images in this folder ({found}). Expected files ending in "
                    f"{', '.join(sorted(suffixes))}; pass a folder that holds images."
                )
            paths.extend(images)
        elif item.is_file():
            paths.append(item)
        elif item.exists():
            errors.append(f"error: {item}: not a regular file or folder (a FIFO or device?); pass an image file")
        else:
            errors.append(f"error: {item}: no such file or folder")
    return paths, errors, skipped, sorted(links)


def first_scene(inputs: list[str]) -> Path | None:
    """The first georeferenced raster among the inputs, listing folders only as far as it."""
    from cnngemma.scenes import RASTER_SUFFIXES, is_georeferenced

    for item in map(Path, inputs):
        for path in sorted_files(item, []) if item.is_dir() else [item] if item.is_file() else []:
            if path.suffix.lower() in RASTER_SUFFIXES and is_georeferenced(path):
                return path
    return None


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
    model, processor, generation = prepare_for_captioning(
        args.model,
        revision=args.revision,
        device=device,
        quantize=args.quantize,
        compile=args.compile,
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        prompt=args.prompt,
        adapter_base=args.adapter_base,
    )
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
            captions = caption_batch(model, processor, images, args.prompt, generation, device, fixed_batch)
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


def scene_flags_given(args) -> bool:
    return any((args.output, args.tile, args.overlap, args.bands, args.stretch, args.stack, args.shard)) or (
        args.max_nodata != 0.5
    )


def number_list(text: str, flag: str, count: int) -> tuple[float, ...]:
    try:
        values = tuple(float(item) for item in text.split(","))
    except ValueError:
        values = ()
    if len(values) != count or not all(map(math.isfinite, values)):
        raise UsageError(f"{flag} {text!r}: expected {count} comma-separated numbers, e.g. {flag} 450,1400.")
    return values


def scene_options(args, paths: list[Path]):
    """The scene job from the flags; bad values are refused before anything is opened or loaded."""
    from cnngemma.scene_jobs import JobOptions
    from cnngemma.scenes import TileSettings

    if args.output is None:
        raise UsageError(
            f"{paths[0] if paths else args.stack[0]} is a georeferenced scene, or scene flags were given: scene mode "
            "writes one GeoJSON feature per tile. Pass --output tiles.geojson."
        )
    image_size = model_image_size(args.model, args.revision)
    tile = image_size if args.tile is None else args.tile
    if tile < 8:
        raise UsageError(
            f"--tile {tile}: expected a tile side of at least 8 pixels (default: the model's {image_size})."
        )
    if not 0 <= args.overlap < tile:
        raise UsageError(f"--overlap {args.overlap}: expected 0 <= overlap < the tile side {tile}.")
    if not 0 <= args.max_nodata <= 1:
        raise UsageError(f"--max-nodata {args.max_nodata:g}: expected a share of pixels in 0..1, e.g. 0.5.")
    stretch = None
    if args.stretch is not None:
        stretch = number_list(args.stretch, "--stretch", 2)
        if stretch[0] >= stretch[1]:
            raise UsageError(f"--stretch {args.stretch}: expected LOW < HIGH, e.g. --stretch 450,1400.")
    bands = None
    if args.bands is not None:
        bands = tuple(item.strip() for item in args.bands.split(","))
        if len(bands) not in (1, 3) or not all(bands) or any(b.isdigit() and int(b) < 1 for b in bands):
            raise UsageError(
                f"--bands {args.bands!r}: expected 3 bands (R,G,B) or 1 (grey), as 1-based numbers or band names, "
                "e.g. --bands 4,3,2 or --bands red,green,blue."
            )
    shard = None
    if args.shard is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError(
            f"--shard {args.shard} under a launcher ({os.environ['WORLD_SIZE']} processes): the launched processes are "
            "the shards already. Drop --shard, or run without the launcher."
        )
    if args.shard is not None:
        index, _, count = args.shard.partition("/")
        if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
            raise UsageError(
                f"--shard {args.shard!r}: expected I/N with 0 <= I < N, e.g. --shard 0/4 ... --shard 3/4."
            )
        shard = (int(index), int(count))
    scenes = [[path] for path in paths]
    for stack in args.stack:
        members = [Path(item) for item in stack.split(",") if item]
        if len(members) < 2 or (missing := [str(m) for m in members if not m.is_file()]):
            problem = (
                f"no such file: {', '.join(missing)}"
                if len(members) >= 2
                else f"it names {len(members)} file(s), a stack needs 2 or more"
            )
            raise UsageError(
                f"--stack {stack}: {problem}. Expected files of one grid, e.g. --stack B04.jp2,B03.jp2,B02.jp2."
            )
        scenes.append(members)
    return JobOptions(
        output=Path(args.output),
        scenes=scenes,
        tiles=TileSettings(tile, args.overlap, bands, stretch, args.max_nodata, args.nodata),
        model=args.model,
        revision=args.revision,
        prompt=args.prompt,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        quantize=args.quantize,
        compile=args.compile,
        adapter_base=args.adapter_base,
        device=args.device,
        shard=shard,
        image_size=image_size,
        attribution=args.attribution,
    )


def model_image_size(model: str, revision: str | None) -> int:
    """The model's input side from its config.json, without loading the model."""
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(model, revision=revision)
    except (OSError, ValueError) as error:
        raise RunError(f"--model {model}: cannot read its config.json ({first_line(error)}).") from None
    return int(config.get("image_size", 224))


def caption(args) -> int:
    """Scene mode when scene flags are given or an input is a georeferenced raster; else images as before."""
    if args.merge:
        from cnngemma.scene_jobs import merge

        return merge(Path(args.output), args.attribution)
    check_model_source(args.model)
    if not (scene_flags_given(args) or first_scene(args.inputs)):
        return caption_images(args)
    from cnngemma.scene_jobs import caption_scenes
    from cnngemma.scenes import RASTER_SUFFIXES

    paths, errors, _, _ = collect_images(args.inputs, IMAGE_SUFFIXES | RASTER_SUFFIXES)
    if errors:
        raise UsageError(errors[0].removeprefix("error: "))
    return caption_scenes(scene_options(args, paths))


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(lambda: caption(args))


if __name__ == "__main__":
    sys.exit(main())
