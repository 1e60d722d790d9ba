"""`build_demo_dataset`: the synthetic aerial set that train_hf.py's CPU demo and the evaluation module use by
default, synthesised once with `synth` and built with `build`; reused when already there."""

from __future__ import annotations

from pathlib import Path

import datasets

from .build import build
from .synth import synthesize


def build_demo_dataset(folder: str | Path, num_images: int, seed: int, size: int = 128) -> Path:
    """The built DatasetDict folder `folder/dataset-{num_images}-{seed}`, made (once) from `folder/raw-...` with
    images of `size` pixels (the demo's 128 px: the tiny config's size, made and decoded 3x faster than 224 px;
    other sizes get a `-{size}px` suffix). The captions depend on the seed only, not on the size."""
    name = f"{num_images}-{seed}" + ("" if size == 128 else f"-{size}px")
    raw, built = Path(folder) / f"raw-{name}", Path(folder) / f"dataset-{name}"
    if (built / "dataset_dict.json").is_file():
        return built
    if not (raw / "captions.csv").is_file():
        synthesize(raw, num_images=num_images, seed=seed, size=size)
    # save_to_disk's "Saving the dataset" bars are noise in the demo's output; `python -m dataset_builder build` keeps them
    bars_were_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        build(raw / "captions.csv", built, images=raw / "resized")
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    return built
