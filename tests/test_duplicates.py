"""Duplicate images in `dataset_builder build`: planted copies of synthetic scenes are found and distinct scenes are
not, the blocked pairing equals brute force, and --drop-eval-duplicates leaves out only eval copies of train images."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from dataset_builder.__main__ import main
from dataset_builder.build import build
from dataset_builder.duplicates import BLOCK, NEAR_DISTANCE, find_duplicates, near_pairs
from dataset_builder.images import check_image
from dataset_builder.synth import make_example

DISTINCT = 300  # synthetic scenes of 13 kinds, 128-224 px: alike within a kind
PER_KIND = 40  # planted copies per kind, each of its own original
TARGETS = ("exact", "jpeg70", "resize80")  # recall >= 0.95 required
REPORTED = ("crop2", "crop5")  # 2% or 5% off each side: reported, no target (phash is weak on crops)


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))


def _crop(image: Image.Image, fraction: float) -> Image.Image:
    dx, dy = round(image.width * fraction), round(image.height * fraction)
    return image.crop((dx, dy, image.width - dx, image.height - dy))


def _plant(kind: str, original: Path, copy: Path) -> None:
    """Write `copy` as a copy of the JPEG `original` made the way `kind` says."""
    if kind == "exact":
        copy.write_bytes(original.read_bytes())
        return
    image = Image.open(original)
    if kind == "jpeg70":
        image.save(copy, "JPEG", quality=70)
    elif kind == "resize80":
        size = (round(image.width * 0.8), round(image.height * 0.8))
        image.resize(size, Image.Resampling.LANCZOS).save(copy, "JPEG", quality=90)
    else:
        _crop(image, {"crop2": 0.02, "crop5": 0.05}[kind]).save(copy, "JPEG", quality=90)


def _write_distinct(folder: Path, count: int, seed: int, sizes) -> list[Path]:
    paths = []
    for index, size in enumerate(sizes[:count]):
        image, _, _ = make_example(seed, index, int(size))
        paths.append(folder / f"scene_{index:03d}.jpg")
        image.save(paths[-1], "JPEG", quality=90)
    return paths


def test_planted_copies_are_found_and_distinct_scenes_are_not(tmp_path):
    sizes = np.random.default_rng(0).integers(128, 225, DISTINCT)
    paths = _write_distinct(tmp_path, DISTINCT, seed=5, sizes=sizes)
    origin = list(range(DISTINCT))  # origin[k]: the distinct scene image k shows
    kinds = [None] * DISTINCT
    for number, kind in enumerate(TARGETS + REPORTED):
        for original in range(number * PER_KIND, (number + 1) * PER_KIND):
            paths.append(tmp_path / f"{kind}_{original:03d}.jpg")
            _plant(kind, paths[original], paths[-1])
            origin.append(original)
            kinds.append(kind)
    checks = [check_image(path) for path in paths]
    pairs = find_duplicates([check.sha256 for check in checks], [check.phash for check in checks])

    true = [pair for pair in pairs if origin[pair.first] == origin[pair.second]]
    precision = len(true) / len(pairs)
    found = {pair.second: pair for pair in true}  # each copy has one original, which comes first
    recall = {kind: sum(kinds[k] == kind for k in found) / PER_KIND for kind in TARGETS + REPORTED}
    print(
        f"\n{DISTINCT} distinct scenes + {PER_KIND} copies per kind: precision {precision:.4f} "
        f"({len(true)} of {len(pairs)} pairs), false pairs {len(pairs) - len(true)} among "
        f"{len(paths) * (len(paths) - 1) // 2:,}; recall "
        + ", ".join(f"{kind} {value:.3f}" for kind, value in recall.items())
        + "; distances "
        + ", ".join(
            f"{kind} max {max((pair.distance for k, pair in found.items() if kinds[k] == kind), default='-')}"
            for kind in TARGETS + REPORTED
        )
    )
    assert all(recall[kind] >= 0.95 for kind in TARGETS), recall
    assert precision >= 0.99
    assert all(pair.exact == (kinds[k] == "exact") for k, pair in found.items())  # re-encoded copies are near ones
    assert all(pair.distance <= NEAR_DISTANCE for pair in pairs)


def _brute_force(words: np.ndarray, max_distance: int) -> set[tuple[int, int, int]]:
    found = set()
    for start in range(0, len(words), 500):
        distance = np.zeros((min(500, len(words) - start), len(words)), np.int64)
        for word in range(words.shape[1]):
            distance += np.bitwise_count(words[start : start + 500, word, None] ^ words[None, :, word])
        for i, j in zip(*np.nonzero(distance <= max_distance), strict=True):
            if j > i + start:
                found.add((int(i + start), int(j), int(distance[i, j])))
    return found


def test_blocked_pairing_equals_brute_force():
    rng = np.random.default_rng(1)
    count = BLOCK[1] + 300  # more than one block of columns and many blocks of rows
    words = rng.integers(0, 2**64, size=(count, 4), dtype=np.uint64)
    # Copies across block edges, at distances either side of the threshold; random hashes are ~128 bits apart.
    for (first, second), flips in zip(
        [(3, 4200), (255, 256), (0, count - 1), (1000, 1001), (4095, 4096), (17, 2000)], [0, 1, 31, 32, 33, 60]
    ):
        bits = rng.choice(256, flips, replace=False)
        copy = np.unpackbits(words[first].view(np.uint8))
        copy[bits] ^= 1
        words[second] = np.packbits(copy).view(np.uint64)
    i, j, distance = near_pairs(words, NEAR_DISTANCE)
    got = list(zip(i.tolist(), j.tolist(), distance.tolist(), strict=True))
    assert got == sorted(_brute_force(words, NEAR_DISTANCE))
    assert {(a, b) for a, b, _ in got} == {(3, 4200), (255, 256), (0, count - 1), (1000, 1001)}
    with pytest.raises(ValueError, match=r"got hashes of shape \(10, 2\).*expected \(N, 4\)"):
        near_pairs(words[:10, :2], NEAR_DISTANCE)


def _rows(dataset: datasets.Dataset) -> list[dict]:
    return dataset.cast_column("image", datasets.Image(decode=False)).to_list()  # image bytes, not pictures


def _read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as file:
        return list(csv.DictReader(file))


@pytest.fixture
def split_copies(tmp_path):
    """Four distinct scenes a-d and copies planted within and across splits; returns (captions, images)."""
    images = tmp_path / "images"
    images.mkdir()
    sizes = [160, 176, 192, 208]
    for path, name in zip(_write_distinct(images, 4, seed=9, sizes=sizes), "abcd", strict=True):
        path.rename(images / f"{name}.jpg")
    _plant("exact", images / "a.jpg", images / "a_copy.jpg")
    _plant("jpeg70", images / "a.jpg", images / "a_q70.jpg")
    _plant("resize80", images / "b.jpg", images / "b_small.jpg")
    _plant("exact", images / "c.jpg", images / "c_copy.jpg")
    rows = [
        ("train", "a.jpg"),
        ("train", "b.jpg"),
        ("train", "a_copy.jpg"),
        ("val", "a_q70.jpg"),
        ("val", "c.jpg"),
        ("test", "b_small.jpg"),
        ("test", "c_copy.jpg"),
        ("test", "d.jpg"),
    ]
    captions = tmp_path / "captions.csv"
    captions.write_text(
        "source,split,image,caption_1,caption_2\n"
        + "".join(f"SYN,{split},{name},a scene {name} .,another look at {name} .\n" for split, name in rows),
        encoding="utf-8",
    )
    return captions, images


def test_duplicates_are_listed_per_split_pair_and_only_the_flag_drops_eval_copies(tmp_path, split_copies):
    captions, images = split_copies
    kept = build(captions, tmp_path / "kept", images=images, num_workers=1)
    listed = _read_csv(tmp_path / "kept" / "duplicates.csv")
    assert [(r["image"], r["split"], r["row"], r["duplicate_of"], r["kind"], r["outcome"]) for r in listed] == [
        ("a_copy.jpg", "train", "4", "a.jpg", "exact", "kept"),
        ("a_q70.jpg", "val", "5", "a.jpg", "near", "kept"),
        ("a_q70.jpg", "val", "5", "a_copy.jpg", "near", "kept"),
        ("b_small.jpg", "test", "7", "b.jpg", "near", "kept"),
        ("c_copy.jpg", "test", "8", "c.jpg", "exact", "kept"),
    ]
    assert all(int(r["distance"]) == 0 for r in listed if r["kind"] == "exact")
    assert all(int(r["distance"]) <= NEAR_DISTANCE for r in listed if r["kind"] == "near")  # 0 happens too
    pairs = kept["duplicates"]["pairs"]
    assert {name: (count["exact"], count["near"]) for name, count in pairs.items()} == {
        "train-train": (1, 0),
        "train-val": (0, 2),
        "train-test": (0, 1),
        "val-val": (0, 0),
        "val-test": (1, 0),
        "test-test": (0, 0),
    }
    assert kept["duplicates"]["images_dropped"] == {"val": 0, "test": 0}
    # every pair is listed in problems.csv too, and nothing is dropped by default
    reasons = [(row["row"], row["reason"]) for row in _read_csv(tmp_path / "kept" / "problems.csv")]
    assert [(row, reason.split(" (line")[0], reason.rsplit(": ", 1)[1]) for row, reason in reasons] == [
        ("4", "exact duplicate of train image a.jpg", "listed only (row kept)"),
        ("5", "near duplicate of train image a.jpg", "listed only (row kept)"),
        ("5", "near duplicate of train image a_copy.jpg", "listed only (row kept)"),
        ("7", "near duplicate of train image b.jpg", "listed only (row kept)"),
        ("8", "exact duplicate of val image c.jpg", "listed only (row kept)"),
    ]
    card = (tmp_path / "kept" / "README.md").read_text()
    assert "| train-val | 0 | 2 |" in card and "Nothing was\ndropped for being a duplicate" in card

    argv = ["build", "--captions", str(captions), "--images", str(images), "--output", str(tmp_path / "dropped")]
    assert main([*argv, "--num-workers", "1", "--drop-eval-duplicates"]) == 0
    dropped = json.loads((tmp_path / "dropped" / "stats.json").read_text())
    assert dropped["duplicates"]["pairs"] == pairs  # the same pairs are found and listed
    assert dropped["duplicates"]["images_dropped"] == {"val": 1, "test": 1}
    assert [(row["split"], row["images_dropped"], row["pairs_dropped"]) for row in dropped["counts"]] == [
        ("train", 0, 0),
        ("val", 1, 2),
        ("test", 1, 2),
    ]
    distance = {r["image"]: r["distance"] for r in listed if r["duplicate_of"] in ("a.jpg", "b.jpg")}
    problems = _read_csv(tmp_path / "dropped" / "problems.csv")
    assert [row for row in problems if row["reason"].endswith("(row dropped)")][::2] == [
        {
            "path": str(images / "a_q70.jpg"),
            "row": "5",
            "reason": f"near duplicate of train image a.jpg (line 2, phash distance {distance['a_q70.jpg']} of 256 "
            "bits): --drop-eval-duplicates (row dropped)",
        },
        {
            "path": str(images / "b_small.jpg"),
            "row": "7",
            "reason": f"near duplicate of train image b.jpg (line 3, phash distance {distance['b_small.jpg']} of "
            "256 bits): --drop-eval-duplicates (row dropped)",
        },
    ]
    assert [row["reason"].rsplit(": ", 1)[1] for row in problems] == [
        "listed only (row kept)",
        *["--drop-eval-duplicates (row dropped)"] * 3,
        "listed only (row kept)",
    ]
    outcomes = [row["outcome"] for row in _read_csv(tmp_path / "dropped" / "duplicates.csv")]
    assert outcomes == ["kept", "dropped", "dropped", "dropped", "kept"]

    # Nothing else changes: the same rows and bytes, less the two dropped images.
    for folder in ("", "grouped"):
        before = datasets.load_from_disk(str(tmp_path / "kept" / folder))
        after = datasets.load_from_disk(str(tmp_path / "dropped" / folder))
        for split, gone in (("train", ()), ("validation", ("a_q70.jpg",)), ("test", ("b_small.jpg",))):
            assert _rows(after[split]) == [row for row in _rows(before[split]) if row["image_id"] not in gone]
    assert (tmp_path / "dropped" / "csv" / "train.csv").read_bytes() == (
        tmp_path / "kept" / "csv" / "train.csv"
    ).read_bytes()


def test_captions_only_build_has_no_duplicate_check(tmp_path, split_copies):
    captions, _ = split_copies
    stats = build(captions, tmp_path / "out")
    assert stats["duplicates"] is None and not (tmp_path / "out" / "duplicates.csv").exists()
    with pytest.raises(ValueError, match="--drop-eval-duplicates needs the images, but the build is captions only"):
        build(captions, tmp_path / "again", drop_eval_duplicates=True)
