"""Command line: `python -m dataset_builder {build,score,synth,push}`; each error ends in one clear line.

Exit status: 0 done, 1 bad data (a table, an image folder, the Hub), 2 bad arguments (nothing was read or written;
this includes an --output that holds other files than an earlier output of the same command).
"""

from __future__ import annotations

import argparse
import json
import sys

from cnngemma.errors import INTERRUPTED, UsageError, path_type

from .tables import SPLIT_ALIASES


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `error: ...`, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see: {self.prog} --help)\n")


def _at_least(minimum: int):
    """An argparse type: a whole number >= `minimum`, checked before any work."""

    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"got {text!r}, expected a whole number >= {minimum}. Fix: pass a number such as {max(minimum, 1)}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(
                f"got {value}, expected a whole number >= {minimum}. Fix: pass {minimum} or more"
            )
        return value

    return whole_number


def parse_args(argv=None) -> argparse.Namespace:
    parser = _Parser(prog="python -m dataset_builder", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", help="clean a caption table (+ images) into a DatasetDict")
    build.add_argument(
        "--captions",
        type=path_type,
        required=True,
        help="CSV in RISCM's raw layout (source,split,image,"
        "caption_1..caption_5) or the long layout (image,caption[,split][,source])",
    )
    images = build.add_mutually_exclusive_group(required=True)
    images.add_argument(
        "--images", type=path_type, help="folder holding the files named in the image column (RISCM: resized/)"
    )
    images.add_argument("--captions-only", action="store_true", help="build without images (no image column)")
    build.add_argument(
        "--output",
        type=path_type,
        required=True,
        help="output folder: written beside it and swapped in at the end; an existing one is replaced only if it is "
        "an earlier build (files of yours inside it are kept and listed), any other folder is refused",
    )
    build.add_argument(
        "--split",
        choices=list(SPLIT_ALIASES),
        help="split of every row, for a long-layout table without a split column (validation = val)",
    )
    build.add_argument(
        "--source", help="source name for a long-layout table without a source column (default: unknown)"
    )
    build.add_argument(
        "--max-side",
        type=int,
        default=1024,
        help="downscale images larger than this (pixels, at least 32; checked by build() before any work)",
    )
    build.add_argument(
        "--strict",
        action="store_true",
        help="fail, listing them, if any image is broken "
        "(default: leave those rows out and list them in problems.csv)",
    )
    build.add_argument(
        "--num-workers",
        type=_at_least(1),
        default=None,
        help="processes for image checks, 1 or more (default: all CPU cores)",
    )
    build.add_argument(
        "--nodata",
        type=float,
        help="pixel value that marks missing data in images that do not declare one (e.g. 0 for Landsat's collars): "
        "left out of the 2-98 percentile stretch and shown black; a TIFF's own GDAL_NODATA and NaN always are",
    )
    build.add_argument(
        "--drop-eval-duplicates",
        action="store_true",
        help="leave out validation and test images that are exact or near duplicates of a training image "
        "(default: keep them; every duplicate pair is listed in problems.csv either way)",
    )

    score = commands.add_parser("score", help="add a clip_score column and a CLIP screening report")
    score.add_argument("--dataset", type=path_type, required=True, help="a folder made by `build` (with images)")
    score.add_argument(
        "--clip-model", type=path_type, required=True, help="local folder or Hub id of a transformers CLIP model"
    )
    score.add_argument("--batch-size", type=_at_least(1), default=64, help="images or captions per forward pass")
    score.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1, mps")
    score.add_argument(
        "--lowest", type=_at_least(1), default=16, help="number of lowest-scoring pairs in the contact sheet"
    )

    synth = commands.add_parser("synth", help="make a synthetic aerial caption set in RISCM's raw layout")
    synth.add_argument(
        "--output",
        type=path_type,
        required=True,
        help="output folder (captions.csv + resized/*.jpg); an existing one is replaced only if it is an earlier "
        "synth output",
    )
    synth.add_argument("--num-images", type=_at_least(1), default=2000, help="number of images")
    synth.add_argument(
        "--seed", type=_at_least(0), default=0, help="random seed (0 or more); the output is a function of it"
    )
    # synthesize() holds the same minimum for Python callers: smaller scenes lose their objects
    synth.add_argument("--size", type=_at_least(32), default=224, help="image side in pixels (at least 32)")
    synth.add_argument("--grid", type=path_type, help="also write a 4x4 sample grid PNG with captions to this path")

    push = commands.add_parser("push", help="push a built dataset and its card to the Hugging Face Hub")
    push.add_argument("--dataset", type=path_type, required=True, help="a folder made by `build`")
    push.add_argument("--repo-id", required=True, help="Hub dataset repository, e.g. user/riscm-clean")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "build":
            from .build import build

            stats = build(
                args.captions,
                args.output,
                images=None if args.captions_only else args.images,
                split=args.split,
                source=args.source,
                max_side=args.max_side,
                strict=args.strict,
                num_workers=args.num_workers,
                drop_eval_duplicates=args.drop_eval_duplicates,
                nodata=args.nodata,
            )
            from .card import counts_table

            print(counts_table(stats["counts"]))
            print(
                f"wrote {args.output}: splits {stats['splits']}, empty splits {stats['empty_splits']}, "
                f"{stats['problems']} problems listed in problems.csv, image checks {stats['image_checks']}"
            )
            for warning in stats["warnings"]:
                print(f"warning: {warning}", file=sys.stderr)
        elif args.command == "score":
            from .score import score

            summary = score(
                args.dataset, args.clip_model, batch_size=args.batch_size, device=args.device, lowest=args.lowest
            )
            print(json.dumps(summary, indent=2))
        elif args.command == "synth":
            from .synth import synthesize

            summary = synthesize(
                args.output, num_images=args.num_images, seed=args.seed, size=args.size, grid=args.grid
            )
            print(json.dumps(summary, indent=2))
        elif args.command == "push":
            from .push import hub_api, push_dataset

            print(push_dataset(hub_api(), args.dataset, args.repo_id, private=args.private))
    except UsageError as error:  # checked before any work: the arguments, not the data, need fixing
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (ValueError, OSError, RuntimeError) as error:
        # TableError, StrictError, offline errors...: one message the user can act on, no traceback.
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
