"""dataset_builder build against hostile or unusual inputs: image names that lead outside --images, tables in UTF-8
with a BOM or UTF-16, out-of-range numbers, very long and empty captions, re-encoded formats and output paths that
would overwrite the inputs. Each test names what the builder did wrong before it was hardened."""

from __future__ import annotations

import csv
import json
import shlex
import subprocess
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from dataset_builder import TableError
from dataset_builder.__main__ import main
from dataset_builder.build import StrictError, UsageError, build

HEADER = "source,split,image,caption_1,caption_2\n"


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))


def _picture(seed: int, size: int = 48) -> Image.Image:
    """Random RGB noise: distinct seeds give pictures that are not near duplicates of each other."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _table(path: Path, names, split: str = "train") -> Path:
    path.write_text(HEADER + "".join(f"T,{split},{name},picture {k} .,view {k} .\n" for k, name in enumerate(names)))
    return path


def _problems(output: Path) -> list[dict]:
    with open(output / "problems.csv", encoding="utf-8", newline="") as file:
        return list(csv.DictReader(file))


def _run(argv, capsys) -> tuple[int, str]:
    """Exit status and stderr of the command line, for errors raised by argparse (SystemExit) or returned by main."""
    try:
        code = main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


def test_images_are_read_only_where_they_resolve_inside_the_folder(tmp_path):
    """Before: `../x.png`, absolute paths and symlinks out of the folder were read, stored (and pushed), unlisted."""
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    _picture(0).save(tmp_path / "secret.png")  # a valid image outside --images
    _picture(1).save(images / "good.png")
    _picture(2).save(images / "sub" / "nested.png")
    _picture(3).save(images / "sub" / "target.png")
    _picture(4).save(images / "absolute_inside.png")
    (images / "link_in.png").symlink_to("sub/target.png")  # inside -> inside: fine
    (images / "link_out.png").symlink_to(tmp_path / "secret.png")
    (images / "loop_a.png").symlink_to("loop_b.png")
    (images / "loop_b.png").symlink_to("loop_a.png")
    names = [
        "good.png",
        "../secret.png",
        str(tmp_path / "secret.png"),
        "/etc/hostname",
        "link_out.png",
        "sub/../../secret.png",
        "sub/nested.png",
        "link_in.png",
        "sub/../good.png",
        str(images / "absolute_inside.png"),
        "loop_a.png",
        "sub/" + "y" * 300 + ".png",  # longer than a file name may be: listed, and the build goes on
    ]
    captions = _table(tmp_path / "captions.csv", names)
    stats = build(captions, tmp_path / "out", images=images, num_workers=1)

    grouped = datasets.load_from_disk(str(tmp_path / "out" / "grouped"))["train"]
    kept = ["good.png", "sub/nested.png", "link_in.png", "sub/../good.png", str(images / "absolute_inside.png")]
    assert grouped["image_id"] == kept  # every name that stays inside the folder, in table order
    secret = (tmp_path / "secret.png").read_bytes()
    stored = grouped.cast_column("image", datasets.Image(decode=False))["image"]
    assert all(image["bytes"] != secret for image in stored)
    assert stored[2]["bytes"] == (images / "sub" / "target.png").read_bytes()

    root = images.resolve()
    outside = {
        "../secret.png": tmp_path / "secret.png",
        str(tmp_path / "secret.png"): tmp_path / "secret.png",
        "/etc/hostname": Path("/etc/hostname").resolve(),
        "link_out.png": tmp_path / "secret.png",
        "sub/../../secret.png": tmp_path / "secret.png",
    }
    listed = [
        (row["row"], row["reason"]) for row in _problems(tmp_path / "out") if "duplicate of" not in row["reason"]
    ]
    assert listed == [
        *(
            (
                str(names.index(name) + 2),
                f"outside --images: {name!r} resolves to {target}, which is not inside {root}; only files inside "
                "--images are read (row dropped)",
            )
            for name, target in outside.items()
        ),
        ("12", f"unreadable: Symlink loop from '{root / 'loop_a.png'}' (row dropped)"),
        ("13", f"unreadable: [Errno 36] File name too long: '{root / names[-1]}' (row dropped)"),
    ]
    assert stats["image_checks"]["outside"] == 5 and stats["image_checks"]["unreadable"] == 2
    with pytest.raises(StrictError, match=r"--strict: 7 of 12 images cannot be used:\n"):
        build(captions, tmp_path / "strict", images=images, strict=True, num_workers=1)


CAFE = "a café by the runway ✈ ."


@pytest.mark.parametrize(
    ("encoding", "name"),
    [
        ("utf-8-sig", "UTF-8 with BOM"),
        ("utf-16", "UTF-16 LE with BOM"),  # Python writes the machine's order, little-endian on x86 and ARM
        ("utf-16-be-bom", "UTF-16 BE with BOM"),
        ("utf-32", "UTF-32 LE with BOM"),
    ],
)
@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_tables_with_a_byte_order_mark_build_like_plain_utf8(tmp_path, encoding, name, newline):
    """Before: a BOM was an error whose suggested one-liner truncated the table to 0 bytes; UTF-16 was refused."""
    text = (HEADER + f"T,train,a.jpg,{CAFE},plain .\nT,test,b.jpg,two .,\n").replace("\n", newline)
    plain = tmp_path / "plain.csv"
    plain.write_bytes(text.encode("utf-8"))
    table = tmp_path / "table.csv"
    content = b"\xfe\xff" + text.encode("utf-16-be") if encoding == "utf-16-be-bom" else text.encode(encoding)
    table.write_bytes(content)
    stats = build(table, tmp_path / "out")
    build(plain, tmp_path / "reference")
    for split in ("train", "test"):
        produced = (tmp_path / "out" / "csv" / f"{split}.csv").read_bytes()
        assert produced == (tmp_path / "reference" / "csv" / f"{split}.csv").read_bytes()
    assert datasets.load_from_disk(str(tmp_path / "out"))["train"]["caption"] == [CAFE, "plain ."]
    assert stats["encoding"] == name and stats["line_ending"] == ("CRLF" if newline == "\r\n" else "LF")
    assert table.read_bytes() == content  # the input is never rewritten


@pytest.mark.parametrize(
    "content",
    [
        (HEADER + "T,train,a.jpg,café .,b .\n").encode("utf-16-le"),
        (HEADER + "T,train,a.jpg,café .,b .\n").encode("utf-16-be"),
        (HEADER + "T,train,a.jpg,café .,b .\n").encode("latin-1"),
    ],
    ids=["utf16le-no-bom", "utf16be-no-bom", "latin1"],
)
def test_the_fix_an_encoding_error_suggests_keeps_the_input_and_works(tmp_path, content):
    """Before: the BOM error's fix opened the table for writing before reading it and left it empty. Every command
    an encoding error suggests is run here: it must leave the input as it was and give a table that builds."""
    table = tmp_path / "table.csv"
    table.write_bytes(content)
    with pytest.raises(TableError) as error:
        build(table, tmp_path / "out")
    command = str(error.value).split("Fix: ")[1].split("e.g. ")[1]
    assert command.startswith("iconv ") and "> FILE." in command  # writes a new file, named after the input
    done = subprocess.run(command.replace("FILE", shlex.quote(str(table))), shell=True, capture_output=True)
    assert done.returncode == 0, done.stderr
    assert table.read_bytes() == content
    build(Path(str(table) + command.rsplit("> FILE", 1)[1].strip()), tmp_path / "out")
    assert datasets.load_from_disk(str(tmp_path / "out"))["train"]["caption"] == ["café .", "b ."]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--max-side", "0"],
            "--max-side 0 is too small. Expected at least 32 pixels. Fix: pass --max-side 32 or more",
        ),
        (["--max-side", "-5"], "--max-side -5 is too small. Expected at least 32 pixels. Fix: pass --max-side 32 or"),
        (["--max-side", "31"], "--max-side 31 is too small. Expected at least 32 pixels. Fix: pass --max-side 32 or"),
        (["--num-workers", "0"], "argument --num-workers: got 0, expected a whole number >= 1. Fix: pass 1 or more"),
        (["--num-workers", "-2"], "argument --num-workers: got -2, expected a whole number >= 1. Fix: pass 1 or"),
        (["--num-workers", "two"], "argument --num-workers: got 'two', expected a whole number >= 1. Fix: pass a"),
        (["--split", "foo"], "argument --split: invalid choice: 'foo' (choose from 'train', 'val', 'validation',"),
    ],
)
def test_build_numbers_out_of_range_fail_before_any_work(tmp_path, capsys, argv, message):
    """Before: --max-side 0 raised ZeroDivisionError, --max-side -5 shrank every image to 1x1 with exit 0, and
    --num-workers 0 quietly meant every core."""
    images = tmp_path / "images"
    images.mkdir()
    _picture(0, 128).save(images / "a.jpg")
    captions = _table(tmp_path / "captions.csv", ["a.jpg"])
    output = tmp_path / "out"
    base = ["build", "--captions", str(captions), "--images", str(images), "--output", str(output)]
    code, err = _run([*base, *argv], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {message}")
    assert not output.exists() and not list(tmp_path.glob(".out.*"))
    if argv[0] == "--max-side":
        with pytest.raises(UsageError, match=f"^--max-side {argv[1]} is too small"):
            build(captions, output, images=images, max_side=int(argv[1]))
    if argv == ["--max-side", "31"]:
        assert main([*base, "--max-side", "32", "--num-workers", "1"]) == 0  # the smallest accepted value works
        assert datasets.load_from_disk(str(output / "grouped"))["train"][0]["image"].size == (32, 32)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["score", "--dataset", "d", "--clip-model", "m", "--batch-size", "0"], "argument --batch-size: got 0"),
        (["score", "--dataset", "d", "--clip-model", "m", "--lowest", "-1"], "argument --lowest: got -1"),
        (["synth", "--output", "o", "--num-images", "0"], "argument --num-images: got 0"),
        (["synth", "--output", "o", "--size", "-3"], "argument --size: got -3, expected a whole number >= 32"),
        (["synth", "--output", "o", "--seed", "-1"], "argument --seed: got -1, expected a whole number >= 0"),
    ],
)
def test_score_and_synth_numbers_are_checked_at_parse_time(tmp_path, capsys, monkeypatch, argv, message):
    """Before: --batch-size 0 failed inside range(), --lowest -1 cut the contact sheet silently, --num-images 0 and
    --size -3 failed only once the command ran."""
    monkeypatch.chdir(tmp_path)
    code, err = _run(argv, capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {message}")
    assert not (tmp_path / "o").exists()


def test_very_long_captions_are_listed_counted_and_kept(tmp_path, capsys):
    """Before: a 100,000-character caption built silently."""
    names = [f"img_{k:02d}.jpg" for k in range(30)]
    lines = [f"T,train,{name},a plane on the apron number {k} .,two planes .\n" for k, name in enumerate(names)]
    long = "a very long caption " * 5000  # 100,000 characters
    lines[7] = f"T,train,{names[7]},a plane .,{long}\n"
    captions = tmp_path / "captions.csv"
    captions.write_text(HEADER + "".join(lines))
    output = tmp_path / "out"
    assert main(["build", "--captions", str(captions), "--captions-only", "--output", str(output)]) == 0
    warning = "very long captions for this dataset (over 300 characters): 1 of 60, kept and listed in problems.csv"
    assert f"warning: {warning}\n" in capsys.readouterr().err
    stats = json.loads((output / "stats.json").read_text())
    assert stats["long_captions"] == {
        "rule": "max(300, 4 x the 99th percentile of kept caption lengths)",
        "limit": 300,
        "captions": 1,
    }
    assert warning in stats["warnings"]
    assert _problems(output) == [
        {
            "path": names[7],
            "row": "9",
            "reason": "caption 2 is 99999 characters, very long for this dataset (over 300): listed only (row kept)",
        }
    ]
    pairs = datasets.load_from_disk(str(output))["train"]
    assert pairs.num_rows == 60 and long.strip() in pairs["caption"]  # the row is kept
    assert "Captions very long for this dataset, over 300 characters" in (output / "README.md").read_text()


def test_the_long_caption_limit_follows_the_dataset(tmp_path):
    """Paragraph-length captions are normal for a dataset of paragraphs: the limit is 4 x their 99th percentile."""
    paragraph = "a long description of an airport with many planes and a runway . " * 6  # 390 characters
    captions = tmp_path / "captions.csv"
    captions.write_text(HEADER + "".join(f"T,train,{k}.jpg,{paragraph}{k},{paragraph}\n" for k in range(50)))
    stats = build(captions, tmp_path / "out")
    assert stats["long_captions"]["limit"] == 4 * len(paragraph + "49") and stats["long_captions"]["captions"] == 0
    assert stats["warnings"] == []


def test_a_table_without_any_caption_fails_before_images_are_read(tmp_path):
    """Before: the build checked every image first, then failed pointing to 'the problems listed above', which
    nothing listed."""
    captions = tmp_path / "captions.csv"
    captions.write_text(HEADER + "T,train,a.jpg,,  \nT,val,b.jpg, ,\n")
    (tmp_path / "images").mkdir()  # empty: the images are never looked for
    with pytest.raises(ValueError) as error:
        build(captions, tmp_path / "out", images=tmp_path / "images")
    assert str(error.value) == (
        f"{captions}: all 4 captions of its 2 images are empty, so there is nothing to build. Expected at least "
        "one non-empty caption. Fix: check that the caption columns hold the captions, or export the table again."
    )
    assert not (tmp_path / "out").exists()


def test_no_usable_image_fails_naming_why(tmp_path):
    """Before: 'no image has a usable caption and image ... Fix: see the problems listed above' (none were)."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "zero.jpg").write_bytes(b"")
    captions = tmp_path / "captions.csv"
    captions.write_text(HEADER + "T,train,gone.jpg,a .,b .\nT,train,zero.jpg,c .,\nT,val,../x.jpg,d .,\n")
    with pytest.raises(ValueError) as error:
        build(captions, tmp_path / "out", images=images, num_workers=1)
    assert str(error.value) == (
        f"{captions}: none of its 3 images can be used (1 missing, 1 zero-byte, 1 outside), so there is nothing "
        f"to build. Expected at least one readable image inside --images {images} with a non-empty caption. Fix: "
        "check that --images is the folder the image column names; --strict lists every unusable image."
    )
    assert not (tmp_path / "out").exists()


def test_an_empty_train_split_is_a_warning(tmp_path, capsys):
    """Before: a build whose training images all had empty captions exited 0 without a word about it."""
    captions = tmp_path / "captions.csv"
    captions.write_text(HEADER + "T,train,a.jpg,,\nT,train,b.jpg, , \nT,val,c.jpg,a plane .,\n")
    output = tmp_path / "out"
    assert main(["build", "--captions", str(captions), "--captions-only", "--output", str(output)]) == 0
    warning = "the train split is empty: no train image is left (dropped: 2, see problems.csv), so this output "
    warning += "cannot train a model"
    assert f"warning: {warning}\n" in capsys.readouterr().err
    stats = json.loads((output / "stats.json").read_text())
    assert stats["warnings"] == [warning] and stats["empty_splits"] == ["train", "test"]
    assert [row["reason"] for row in _problems(output)] == ["no captions: all 2 captions are empty (row dropped)"] * 2
    evaluation_only = build(_table(tmp_path / "test.csv", ["a.jpg"], split="test"), tmp_path / "test_only")
    assert evaluation_only["warnings"] == [
        "the train split is empty: the table has no train rows (an evaluation-only build)"
    ]


def test_every_reencoded_image_is_listed_as_converted(tmp_path):
    """Before: WebP, BMP and RGB TIFF files were re-encoded as PNG with nothing in problems.csv."""
    images = tmp_path / "images"
    images.mkdir()
    for seed, (name, options) in enumerate(
        {
            "a.webp": {"lossless": True},
            "b.bmp": {},
            "c.gif": {},
            "d.tif": {},
            "e.jpg": {"quality": 90},
            "f.png": {},
        }.items()
    ):
        _picture(seed).save(images / name, **options)
    captions = _table(tmp_path / "captions.csv", sorted(path.name for path in images.iterdir()))
    stats = build(captions, tmp_path / "out", images=images, num_workers=1)
    listed = {Path(row["path"]).name: row["reason"] for row in _problems(tmp_path / "out")}
    assert listed == {
        "a.webp": "converted: WEBP stored as PNG (row kept)",
        "b.bmp": "converted: BMP stored as PNG (row kept)",
        "c.gif": "converted: mode P to RGB (row kept)",
        "d.tif": "converted: TIFF stored as PNG (row kept)",
    }
    assert {key: count for key, count in stats["image_checks"].items() if key.startswith("converted")} == {
        "converted from WEBP": 1,
        "converted from BMP": 1,
        "converted from mode P": 1,
        "converted from TIFF": 1,
    }
    grouped = datasets.load_from_disk(str(tmp_path / "out" / "grouped"))["train"]
    assert grouped["image_id"] == ["a.webp", "b.bmp", "c.gif", "d.tif", "e.jpg", "f.png"]
    for row in grouped.select([0, 1, 3]):  # lossless sources: the stored PNG holds the same pixels
        assert np.array_equal(np.asarray(row["image"]), np.asarray(Image.open(images / row["image_id"])))


def _earlier_output(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "images"
    images.mkdir()
    _picture(0).save(images / "a.png")
    captions = _table(tmp_path / "captions.csv", ["a.png"])
    build(captions, tmp_path / "earlier", images=images, num_workers=1)
    return captions, images


@pytest.mark.parametrize(
    "case",
    ["output is a file", "output inside images", "output is images", "images inside output", "captions inside output"],
)
def test_output_paths_that_would_lose_data_fail_before_any_work(tmp_path, capsys, case):
    """Before: an --output inside --images was written there, and an earlier output holding the images or the table
    was replaced with them in it; an --output that is a file was called 'not a dataset_builder output'."""
    captions, images = _earlier_output(tmp_path)
    earlier = tmp_path / "earlier"
    if case == "output is a file":
        output = tmp_path / "notes.txt"
        output.write_text("mine")
    elif case == "output inside images":
        output = images / "built"
    elif case == "output is images":
        output = images
    elif case == "images inside output":
        output = earlier
        images = earlier / "resized"
        images.mkdir()
        _picture(0).save(images / "a.png")
    else:
        output = earlier
        captions = _table(earlier / "mine.csv", ["a.png"])
    before = sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*"))
    capsys.readouterr()  # the earlier build's progress bars
    code, err = _run(["build", "--captions", str(captions), "--images", str(images), "--output", str(output)], capsys)
    expected = {
        "output is a file": f"--output {output} is a file. Expected a folder: a new or empty one, or an earlier "
        "output to replace. Fix: choose another --output; a file is never replaced.",
        "output inside images": f"--output {output} is inside --images {images}. Expected an output folder outside "
        "the images, which the build only reads. Fix: choose an --output outside that folder.",
        "images inside output": f"--images {images} is inside --output {output}, which the build replaces. Expected "
        "the images outside the output folder. Fix: move the images, or choose another --output.",
        "captions inside output": f"--captions {captions} is inside --output {output}, which the build replaces. "
        "Expected a table outside the output folder. Fix: copy the table elsewhere, or choose another --output.",
    }
    expected["output is images"] = expected["output inside images"]
    assert (code, err) == (2, f"error: {expected[case]}\n")  # a wrong --output is a bad argument: exit 2
    assert sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*")) == before  # nothing was touched


def test_worker_processes_apply_the_same_checks(tmp_path):
    """64 images or more go to worker processes: containment and the converted listing happen there too."""
    images = tmp_path / "images"
    images.mkdir()
    names = []
    for seed in range(66):
        names.append(f"{seed:02d}.webp" if seed % 11 == 0 else f"{seed:02d}.png")
        _picture(seed, 16).save(images / names[-1], **({"lossless": True} if seed % 11 == 0 else {}))
    _picture(99, 16).save(tmp_path / "x.png")
    captions = _table(tmp_path / "captions.csv", [*names, "../x.png"])
    stats = build(captions, tmp_path / "out", images=images, num_workers=2)
    assert stats["image_checks"] == {"converted from WEBP": 6, "outside": 1}
    assert datasets.load_from_disk(str(tmp_path / "out" / "grouped"))["train"]["image_id"] == names
