"""dataset_builder build: the cleaning rule, the exact match on RISCM's test split, bad images, bad tables and
new-first output (a SIGKILLed build re-run gives the same dataset)."""

from __future__ import annotations

import csv
import filecmp
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
from conftest import RISCM_DIR

from dataset_builder import TableError, clean_captions, read_caption_table, reference_order
from dataset_builder.build import StrictError, build

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bad_inputs", REPO / "tests" / "fixtures" / "dataset" / "bad_inputs.py")
bad_inputs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bad_inputs)


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))


def _riscm() -> Path:
    return RISCM_DIR


def test_clean_captions_rule():
    cleaned = clean_captions(["  A plane .", "a PLANE . ", "", "   ", "Two planes .", "a plane ."])
    assert cleaned.kept == ("A plane .", "Two planes .")
    assert (cleaned.duplicates, cleaned.empties) == (2, 2)


def test_reference_order_is_rank_major():
    assert reference_order([["a1", "a2", "a3"], ["b1"], ["c1", "c2"]]) == [
        (0, "a1"),
        (1, "b1"),
        (2, "c1"),
        (0, "a2"),
        (2, "c2"),
        (0, "a3"),
    ]


def test_riscm_test_split_cleans_to_the_reference_exactly(tmp_path):
    riscm = _riscm()
    stats = build(riscm / "captions_test.csv", tmp_path / "out")
    produced = (tmp_path / "out" / "csv" / "test.csv").read_bytes()
    assert produced == (riscm / "test.csv").read_bytes()  # same rows, order and text, byte for byte
    pairs = datasets.load_from_disk(str(tmp_path / "out"))
    assert list(pairs) == ["test"] and pairs["test"].num_rows == 19_483
    with open(riscm / "test.csv", encoding="utf-8", newline="") as file:
        reference = [(row["image"], row["caption"]) for row in csv.DictReader(file)]
    assert list(zip(pairs["test"]["image_id"], pairs["test"]["caption"], strict=True)) == reference
    assert "image" not in pairs["test"].column_names
    assert stats["empty_splits"] == ["train", "validation"] and stats["line_ending"] == "CRLF"
    assert stats["encoding"] == "UTF-8"
    # RISCM's longest caption has 210 characters: nothing is near the very-long mark of 4 x 143 (99th percentile)
    assert (stats["long_captions"]["limit"], stats["long_captions"]["captions"]) == (572, 0)
    assert stats["warnings"] == ["the train split is empty: the table has no train rows (an evaluation-only build)"]
    counts = {row["source"]: row for row in stats["counts"]}
    assert {
        s: (c["images"], c["captions_in"], c["duplicates_removed"], c["empties_removed"], c["pairs_out"])
        for s, c in counts.items()
    } == {"NWPU": (3150, 15750, 30, 0, 15720), "RSICD": (1094, 5470, 2699, 0, 2771), "UCM": (210, 1050, 58, 0, 992)}
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| **test** | **all** | **4,454** | **22,270** | **2,787** | **0** | **19,483** | **0** |" in card
    grouped = datasets.load_from_disk(str(tmp_path / "out" / "grouped"))["test"]
    assert grouped.num_rows == 4454 and sum(len(c) for c in grouped["captions"]) == 19_483


def test_long_layout_needs_split_and_accepts_validation_alias(tmp_path):
    table = tmp_path / "long.csv"
    table.write_text("image,caption\na.jpg,one .\na.jpg,ONE . \nb.jpg,two .\na.jpg,three .\n", encoding="utf-8")
    with pytest.raises(TableError) as error:
        read_caption_table(table)
    assert str(error.value) == (
        f"{table}, line 1: the header ['image', 'caption'] has no 'split' column. Expected a "
        "split column or --split. Fix: pass --split train, --split val or --split test"
    )
    stats = build(table, tmp_path / "out", split="validation", source="MINE")
    pairs = datasets.load_from_disk(str(tmp_path / "out"))
    assert list(pairs) == ["validation"]
    assert pairs["validation"]["caption"] == ["one .", "two .", "three ."]
    assert pairs["validation"]["split"] == ["val"] * 3 and set(pairs["validation"]["source"]) == {"MINE"}
    assert stats["counts"][0]["duplicates_removed"] == 1
    assert (tmp_path / "out" / "csv" / "train.csv").read_text() == "image,caption\n"
    assert (tmp_path / "out" / "problems.csv").read_text() == "path,row,reason\n"


@pytest.mark.parametrize("name", sorted(bad_inputs.BAD_TABLES))
def test_bad_table_error_names_file_line_column(tmp_path, name):
    content, expected = bad_inputs.BAD_TABLES[name]
    table = tmp_path / name
    table.write_bytes(content)
    with pytest.raises(TableError) as error:
        build(table, tmp_path / "out")
    assert str(error.value).startswith(f"{table}, {expected}")
    assert not (tmp_path / "out").exists()


def test_bad_table_cli_gives_one_line_and_exit_code(tmp_path):
    table = tmp_path / "unknown_split.csv"
    table.write_bytes(bad_inputs.BAD_TABLES["unknown_split.csv"][0])
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dataset_builder",
            "build",
            "--captions",
            str(table),
            "--captions-only",
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: {table}, {bad_inputs.BAD_TABLES['unknown_split.csv'][1]}"]


@pytest.fixture(scope="module")
def image_fixture(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_images")
    bad_inputs.write_all(folder)
    return folder


def _read_pairs(folder: Path) -> list[dict]:
    with open(folder / "duplicates.csv", encoding="utf-8", newline="") as file:
        return list(csv.DictReader(file))


def test_bad_images_are_listed_converted_and_never_lose_valid_rows(tmp_path, image_fixture):
    stats = build(image_fixture / "captions.csv", tmp_path / "out", images=image_fixture / "images", num_workers=2)
    with open(tmp_path / "out" / "problems.csv", encoding="utf-8", newline="") as file:
        rows = list(csv.DictReader(file))
    # the fixture's images are copies of one picture: the duplicate pairs are listed too (tests/test_duplicates.py)
    problems = {Path(row["path"]).name: row["reason"] for row in rows if " duplicate of " not in row["reason"]}
    assert problems == {**bad_inputs.BROKEN_IMAGES, **bad_inputs.CONVERTED_IMAGES}
    assert sum(" duplicate of " in row["reason"] for row in rows) == len(_read_pairs(tmp_path / "out"))
    assert stats["image_checks"]["downscaled"] == 1
    assert {
        k: v for k, v in stats["image_checks"].items() if k in ("missing", "zero-byte", "unreadable", "truncated")
    } == dict.fromkeys(("missing", "truncated", "unreadable", "zero-byte"), 1)
    grouped = datasets.load_from_disk(str(tmp_path / "out" / "grouped"))["train"]
    kept = [*bad_inputs.GOOD_IMAGES, *bad_inputs.CONVERTED_IMAGES]
    assert grouped["image_id"] == kept  # every valid row is there, in table order
    for row in grouped:
        image = row["image"]
        assert image.mode == "RGB" and max(image.size) <= 1024
        assert np.asarray(image).max() - np.asarray(image).min() > 200, row["image_id"]  # 12-bit data stretched
    raw = grouped.cast_column("image", datasets.Image(decode=False))[0]["image"]["bytes"]
    assert raw == (image_fixture / "images" / "good.jpg").read_bytes()  # good files are stored untouched
    pairs = datasets.load_from_disk(str(tmp_path / "out"))["train"]
    assert pairs.num_rows == 3 * len(kept) and pairs[0]["image"].size == (64, 48)
    assert stats["counts"][0]["images_dropped"] == 4 and stats["counts"][0]["pairs_dropped"] == 12


def test_strict_fails_with_the_list(tmp_path, image_fixture):
    with pytest.raises(StrictError) as error:
        build(
            image_fixture / "captions.csv",
            tmp_path / "out",
            images=image_fixture / "images",
            strict=True,
            num_workers=1,
        )
    message = str(error.value)
    assert message.startswith("--strict: 4 of 16 images cannot be used:\n")
    assert f"  {image_fixture / 'images' / 'zero.jpg'} (line 5): zero-byte: the file is empty (row dropped)" in message
    assert not (tmp_path / "out").exists()


def _same_tree(a: Path, b: Path) -> None:
    """Same files with the same bytes; the records (cnngemma_output.json) differ only in when they were written."""
    left = sorted(p.relative_to(a) for p in a.rglob("*"))
    assert left == sorted(p.relative_to(b) for p in b.rglob("*"))
    for relative in left:
        if relative.name == "cnngemma_output.json":
            records = [json.loads((root / relative).read_text()) for root in (a, b)]
            for record in records:
                del record["written"]
            assert records[0] == records[1]  # tool, version and every file's size and sha256
        elif (a / relative).is_file():
            assert filecmp.cmp(a / relative, b / relative, shallow=False), relative


def test_killed_build_leaves_nothing_half_written_and_rerun_is_identical(tmp_path, image_fixture):
    captions = tmp_path / "many.csv"
    good = [f"copy_{k:03d}.png" for k in range(40)]
    images = tmp_path / "images"
    images.mkdir()
    source = (image_fixture / "images" / "mode_p.png").read_bytes()
    for name in good:
        (images / name).write_bytes(source)
    captions.write_text(bad_inputs.caption_table(good), encoding="utf-8")
    reference = tmp_path / "reference"
    build(captions, reference, images=images, num_workers=1)
    output = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "dataset_builder",
        "build",
        "--captions",
        str(captions),
        "--images",
        str(images),
        "--output",
        str(output),
        "--num-workers",
        "1",
    ]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.partial-*")) and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert list(tmp_path.glob(".out.partial-*")), "the build finished before it could be killed"
    assert not output.exists()  # nothing that could load half-written
    build(captions, output, images=images, num_workers=1)
    assert not list(tmp_path.glob(".out.*"))  # the killed run's leftovers are gone
    _same_tree(reference, output)
    assert json.loads((output / "stats.json").read_text())["counts"][0]["pairs_out"] == 120
