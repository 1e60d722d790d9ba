"""Benchmark of dataset_builder: captions-only build of a RISCM-sized table (44,521 images x 5 captions), the image
build's, synth's and image checks' images/s with the perceptual hash's share, and pairing 44,521 image hashes.
Run: python benchmarks/bench_dataset.py [--repeats N]."""

from __future__ import annotations

import argparse
import csv
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from dataset_builder.build import build  # noqa: E402
from dataset_builder.duplicates import NEAR_DISTANCE, near_pairs, perceptual_hash  # noqa: E402
from dataset_builder.images import check_image  # noqa: E402
from dataset_builder.synth import synthesize  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement")
    parser.add_argument("--images", type=int, default=44_521, help="images in the captions-only table")
    parser.add_argument("--image-build-images", type=int, default=1000, help="synthetic images for the image build")
    parser.add_argument("--num-workers", type=int, default=None, help="image-check processes (default: all cores)")
    parser.add_argument("--pairing-images", type=int, default=44_521, help="random image hashes to pair")
    return parser.parse_args()


def riscm_sized_table(path: Path, images: int) -> None:
    """A raw-layout table with RISCM's shape: ~25% of images repeat a caption up to case/space."""
    rng = random.Random(0)
    words = "a the plane ship car tank house river bridge road green red white many two three near next to of".split()
    with open(path, "w", encoding="utf-8", newline="") as file:
        writer = csv.writer(file, lineterminator="\r\n")
        writer.writerow(["source", "split", "image", *(f"caption_{n}" for n in range(1, 6))])
        for index in range(images):
            captions = [" ".join(rng.choices(words, k=rng.randint(6, 14))) + " ." for _ in range(5)]
            if rng.random() < 0.25:
                captions[4] = captions[0].upper() + " "
            split = "train" if index % 10 < 8 else "val" if index % 10 == 8 else "test"
            writer.writerow([("NWPU", "RSICD", "UCM")[index % 3], split, f"IMG_{index:06d}.jpg", *captions])


def timed(function, repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - start)
    return seconds


def report(name: str, seconds: list[float], unit_count: int | None = None) -> None:
    median = statistics.median(seconds)
    spread = f"min {min(seconds):.2f} s, max {max(seconds):.2f} s"
    rate = f", {unit_count / median:,.0f} images/s" if unit_count else ""
    print(f"{name}: median {median:.2f} s ({spread}, n={len(seconds)}){rate}", flush=True)


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        table = folder / "captions.csv"
        riscm_sized_table(table, args.images)
        report(
            f"captions-only build, {args.images:,} images x 5 captions",
            timed(lambda: build(table, folder / "captions_only"), args.repeats),
        )
        synth_seconds = timed(lambda: synthesize(folder / "synth", num_images=args.image_build_images, seed=0), 1)
        report(f"synth, {args.image_build_images:,} images (one process)", synth_seconds, args.image_build_images)
        report(
            f"image build, {args.image_build_images:,} synthetic 224 px JPEGs",
            timed(
                lambda: build(
                    folder / "synth" / "captions.csv",
                    folder / "with_images",
                    images=folder / "synth" / "resized",
                    num_workers=args.num_workers,
                ),
                args.repeats,
            ),
            args.image_build_images,
        )
        files = sorted((folder / "synth" / "resized").iterdir())
        report(
            f"check_image, {len(files):,} synthetic 224 px JPEGs (one process, perceptual hash included)",
            timed(lambda: [check_image(path) for path in files], args.repeats),
            len(files),
        )
        decoded = [Image.open(path).convert("RGB") for path in files]
        report(
            f"perceptual hash alone, {len(files):,} decoded 224 px images (one process)",
            timed(lambda: [perceptual_hash(image) for image in decoded], args.repeats),
            len(files),
        )
    hashes = np.random.default_rng(0).integers(0, 2**64, size=(args.pairing_images, 4), dtype=np.uint64)
    report(
        f"pairing {args.pairing_images:,} random 256-bit hashes (all pairs, distance <= {NEAR_DISTANCE})",
        timed(lambda: near_pairs(hashes, NEAR_DISTANCE), args.repeats),
    )


if __name__ == "__main__":
    main()
