"""Nothing lost in dataset_builder and load_image: output folders that are not the builder's own are refused and
kept byte for byte, CSV cells never run as spreadsheet formulas, invisible and NFD captions are cleaned, misleading
wordings, files that would cost gigabytes of memory, and NaN / no-data pixels."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import struct
import threading
import zlib
from pathlib import Path

import datasets
import numpy as np
import pytest
import rasterio
import tifffile
from PIL import Image, UnidentifiedImageError

import modeling_cnngemma.image_processing_cnngemma as decoding
from dataset_builder import TableError, clean_captions, read_caption_table
from dataset_builder.__main__ import main
from dataset_builder.build import StrictError, build
from dataset_builder.images import check_image
from dataset_builder.synth import synthesize
from modeling_cnngemma.image_processing_cnngemma import PIXEL_LIMIT, NoValidPixelsError, load_image

GDAL_NODATA = 42113
REFUSED = (
    "Expected a new or empty folder, or an earlier output of dataset_builder build; no flag replaces other files. "
    "Pass another --output."
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))


def _snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file below `folder`."""
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _run(argv, capsys) -> tuple[int, str]:
    """Exit status and stderr of `python -m dataset_builder ARGV`, run in this process."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


def _table(path: Path, rows, header: str = "image,caption,split") -> Path:
    """A long-layout table written with Python's csv quoting."""
    buffer = io.StringIO()
    import csv

    csv.writer(buffer, lineterminator="\n").writerows([header.split(","), *rows])
    path.write_text(buffer.getvalue(), encoding="utf-8")
    return path


def _captions(tmp_path: Path, text: str = "a red plane .") -> Path:
    return _table(tmp_path / "captions.csv", [["a.jpg", text, "train"], ["b.jpg", "two ships .", "train"]])


def _csv_text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


# --- output folders (A21) --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("record", ["recorded", "legacy"])
def test_build_refuses_a_synth_output_and_keeps_it_byte_for_byte(tmp_path, capsys, record):
    """Before: `synth --output raw` then `build --output raw` deleted the synthetic images and captions.csv."""
    raw = tmp_path / "raw"
    synthesize(raw, num_images=4, size=32)
    if record == "legacy":  # an earlier version's synth output: no record, its stats.json and layout only
        (raw / "cnngemma_output.json").unlink()
    before = _snapshot(raw)
    code, err = _run(
        ["build", "--captions", str(_captions(tmp_path)), "--captions-only", "--output", str(raw)], capsys
    )
    writer = " (written by dataset_builder synth)" if record == "recorded" else ""
    what = f"{writer}: captions.csv, resized/SYN_00000.jpg, resized/SYN_00001.jpg, resized/SYN_00002.jpg and 2 more"
    assert (code, err) == (
        2,
        f"error: --output {raw} holds files that dataset_builder build did not write{what}. {REFUSED}\n",
    )
    assert _snapshot(raw) == before
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".")]  # no hidden leftovers


def test_synth_refuses_a_build_output(tmp_path, capsys):
    out = tmp_path / "out"
    build(_captions(tmp_path), out)
    before = _snapshot(out)
    code, err = _run(["synth", "--output", str(out), "--num-images", "2", "--size", "32"], capsys)
    assert code == 2
    assert err == (
        f"error: --output {out} holds files that dataset_builder synth did not write (written by dataset_builder "
        "build): README.md, csv/test.csv, csv/train.csv, csv/val.csv and 10 more. Expected a new or empty "
        "folder, or an earlier output of dataset_builder synth; no flag replaces other files. Pass another --output.\n"
    )
    assert _snapshot(out) == before


@pytest.mark.parametrize(
    "stats", ["{}", '{"builder": "dataset_builder/3"}'], ids=["any stats.json", "builder stats, no dataset_dict"]
)
def test_a_user_folder_with_a_stats_json_is_refused(tmp_path, capsys, stats):
    """Before: any folder holding a file named stats.json was taken for an earlier output and replaced whole."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "stats.json").write_text(stats)
    (mine / "thesis.tex").write_text("\\section{Precious}\n")
    before = _snapshot(mine)
    code, err = _run(
        ["build", "--captions", str(_captions(tmp_path)), "--captions-only", "--output", str(mine)], capsys
    )
    assert (code, err) == (
        2,
        f"error: --output {mine} holds files that dataset_builder build did not write: stats.json, thesis.tex. "
        f"{REFUSED}\n",
    )
    assert _snapshot(mine) == before


@pytest.mark.parametrize("record", ["legacy", "recorded"])
def test_an_earlier_build_is_replaced_and_the_users_files_in_it_are_kept(tmp_path, capsys, record):
    out = tmp_path / "out"
    build(_captions(tmp_path, "a red plane ."), out)
    if record == "legacy":  # an earlier version's output: no record, the build layout only
        (out / "cnngemma_output.json").unlink()
    planted = {"notes.txt": b"my notes\n", "csv/annotations.xlsx": b"PK\x03\x04 not ours"}
    for name, content in planted.items():
        (out / name).write_bytes(content)
    (out / "README.md").write_text("my edited card\n")  # a file of the layout that the user changed
    edited = hashlib.sha256(b"my edited card\n").hexdigest()
    code, err = _run(
        ["build", "--captions", str(_captions(tmp_path, "a blue plane .")), "--captions-only", "--output", str(out)],
        capsys,
    )
    assert code == 0
    after = _snapshot(out)
    for name, content in planted.items():
        assert after[name] == hashlib.sha256(content).hexdigest()
    if record == "legacy":  # the layout's files were the builder's: replaced, the user's edit with them
        assert err.splitlines()[-1] == (
            f"{out}: kept 2 file(s) that dataset_builder build did not write: csv/annotations.xlsx, notes.txt"
        )
    else:  # the record shows that README.md changed since: kept beside the new card
        (kept,) = [name for name in after if name.endswith("/README.md")]
        assert kept.startswith("kept-") and after[kept] == edited
        assert err.splitlines()[-1] == (
            f"{out}: kept 3 file(s) that dataset_builder build did not write: {kept}, csv/annotations.xlsx, notes.txt"
        )
    assert "a blue plane ." in _csv_text(out / "csv" / "train.csv")
    assert json.loads((out / "cnngemma_output.json").read_text())["tool"] == "dataset_builder build"
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".")]  # no hidden leftovers


def test_a_kept_file_whose_folder_is_a_file_in_the_new_output_goes_under_kept(tmp_path, capsys):
    """Before: the user's README.md/notes.txt (README.md made a folder) crashed the swap once the new output had a
    README.md file, and stayed behind in a hidden .out.old-* folder."""
    out = tmp_path / "out"
    build(_captions(tmp_path), out)
    (out / "README.md").unlink()
    (out / "README.md").mkdir()
    (out / "README.md" / "notes.txt").write_text("mine\n")
    code, err = _run(
        ["build", "--captions", str(_captions(tmp_path)), "--captions-only", "--output", str(out)], capsys
    )
    (kept,) = [name for name in _snapshot(out) if name.endswith("notes.txt")]
    assert code == 0 and kept.startswith("kept-") and kept.endswith("/README.md/notes.txt")
    assert (out / kept).read_text() == "mine\n" and (out / "README.md").is_file()
    assert err.splitlines()[-1] == f"{out}: kept 1 file(s) that dataset_builder build did not write: {kept}"
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".")]


def test_a_build_that_fails_midway_leaves_the_earlier_output_byte_identical(tmp_path, capsys, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (16, 12), (200, 40, 40)).save(images / "a.jpg")
    (images / "b.jpg").write_bytes(b"not a jpeg")
    captions = _captions(tmp_path)
    out = tmp_path / "out"
    build(captions, out, images=images, num_workers=1)
    (out / "notes.txt").write_text("mine\n")
    before = _snapshot(out)
    with pytest.raises(StrictError):  # refused after the image checks, before anything is written
        build(captions, out, images=images, num_workers=1, strict=True)
    assert _snapshot(out) == before

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("dataset_builder.build.write_card", disk_full)  # the last file the build writes
    argv = ["build", "--captions", str(captions), "--images", str(images), "--output", str(out), "--num-workers", "1"]
    code, err = _run(argv, capsys)
    assert (code, err.splitlines()[-1]) == (
        1,
        f"error: writing --output {out} failed: No space left on device (OSError). Nothing half-written was kept; "
        "free space (or raise the limit) and run again.",
    )
    assert _snapshot(out) == before
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".")]  # no hidden leftovers


# --- CSV cells (A05) -------------------------------------------------------------------------------------------------


def test_csv_cells_that_would_run_as_formulas_get_an_apostrophe(tmp_path):
    rows = [
        ["a.jpg", '=HYPERLINK("http://evil.example","click")', "train"],
        ["a.jpg", "+cmd|' /C calc'!A0", "train"],
        ["=b.jpg", "@SUM(1+1)", "train"],
        ["=b.jpg", "-2 planes and a tab\there .", "train"],
        ["-c.jpg", " ", "train"],
    ]
    out = tmp_path / "out"
    build(_table(tmp_path / "captions.csv", rows), out)
    assert _csv_text(out / "csv" / "train.csv") == (
        "image,caption\n"
        'a.jpg,"\'=HYPERLINK(""http://evil.example"",""click"")"\n'
        "'=b.jpg,'@SUM(1+1)\n"
        "a.jpg,'+cmd|' /C calc'!A0\n"
        "'=b.jpg,'-2 planes and a tab\there .\n"
    )
    assert _csv_text(out / "problems.csv") == (
        "path,row,reason\n'-c.jpg,6,no captions: all 1 captions are empty (row dropped)\n"
    )
    pairs = datasets.load_from_disk(str(out))["train"]  # the dataset keeps the text as it is
    assert pairs["caption"][0] == '=HYPERLINK("http://evil.example","click")' and pairs["image_id"][1] == "=b.jpg"

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (16, 12), (10, 120, 200)).save(images / "a.png")
    (images / "@b.png").write_bytes((images / "a.png").read_bytes())
    table = _table(tmp_path / "copies.csv", [["a.png", "a pool .", "train"], ["@b.png", "a pool .", "train"]])
    build(table, tmp_path / "copies", images=images, num_workers=1)
    assert _csv_text(tmp_path / "copies" / "duplicates.csv").splitlines()[1] == (
        "'@b.png,train,3,a.png,train,2,exact,0,kept"
    )


# --- captions: invisible characters and Unicode spellings (A06, A08) -------------------------------------------------


def test_nfc_and_nfd_spellings_are_one_caption_and_invisible_captions_are_empty(tmp_path):
    cleaned = clean_captions(["Café .", "Cafe\u0301 .", "\u200b", "\ufeff \u2060", "\u200c\u200d", " ", "a plane ."])
    assert cleaned.kept == ("Café .", "a plane .") and cleaned.kept[0] == "Caf\u00e9 ."  # NFC
    assert (cleaned.duplicates, cleaned.empties, cleaned.invisible) == (1, 4, (2, 3, 4))
    rows = [["a.jpg", text, "train"] for text in ("Cafe\u0301 .", "Café .", "\u200b\u200b")]
    rows.append(["b.jpg", "\ufeff", "train"])
    out = tmp_path / "out"
    stats = build(_table(tmp_path / "captions.csv", rows), out)
    assert _csv_text(out / "csv" / "train.csv") == "image,caption\na.jpg,Café .\n"
    assert _csv_text(out / "problems.csv").splitlines()[1:] == [
        "a.jpg,4,caption 3 holds only invisible characters (U+200B ZERO WIDTH SPACE x2): dropped as an empty caption",
        "b.jpg,5,caption 1 holds only invisible characters (U+FEFF ZERO WIDTH NO-BREAK SPACE): dropped as an empty "
        "caption",
        "b.jpg,5,no captions: all 1 captions are empty (row dropped)",
    ]
    counts = stats["counts"][0]
    assert (counts["duplicates_removed"], counts["empties_removed"], counts["pairs_out"]) == (1, 2, 1)


# --- wording (A04, A16, A17, B15, B16) -------------------------------------------------------------------------------


def test_a_million_character_caption_names_the_field_limit(tmp_path):
    table = tmp_path / "long.csv"
    table.write_text("image,caption,split\na.jpg,a plane .,train\nb.jpg," + "x" * 1_000_000 + ",train\n")
    with pytest.raises(TableError) as error:
        read_caption_table(table)
    assert str(error.value) == (
        f"{table}, line 3, column 2 ('caption'): a field of 1,000,000 characters, over the limit of 131,072 for one "
        "caption. Expected captions of ordinary length. Fix: shorten or remove that caption (or check that the "
        "column holds captions, not pasted text)"
    )


def test_a_folder_or_device_as_the_table_says_what_it_is_and_a_pipe_is_read(tmp_path, capsys):
    (tmp_path / "tables").mkdir()
    _captions(tmp_path / "tables")
    argv = ["build", "--captions-only", "--output", str(tmp_path / "out"), "--captions"]
    assert _run([*argv, str(tmp_path / "tables")], capsys) == (
        1,
        f"error: {tmp_path / 'tables'}: a folder, not a caption table. Expected a CSV file. Fix: pass the table file "
        "inside it such as captions.csv.\n",
    )
    assert _run([*argv, "/dev/null"], capsys) == (
        1,
        "error: /dev/null: a device file, not a regular file. Expected a CSV file (or a pipe). Fix: pass the table "
        "file.\n",
    )
    content = (tmp_path / "tables" / "captions.csv").read_bytes()
    pipe = tmp_path / "pipe.csv"
    os.mkfifo(pipe)  # as `--captions <(zcat captions.csv.gz)` passes /dev/fd/63
    writer = threading.Thread(target=pipe.write_bytes, args=(content,))
    writer.start()
    stats = build(pipe, tmp_path / "out")
    writer.join()
    assert stats["captions_sha256"] == hashlib.sha256(content).hexdigest()  # read once, all of it
    assert (
        _csv_text(tmp_path / "out" / "csv" / "train.csv") == "image,caption\na.jpg,a red plane .\nb.jpg,two ships .\n"
    )


def test_folders_fifos_and_broken_links_in_images_are_listed_with_their_reason(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (16, 12), (10, 120, 200)).save(images / "good.png")
    (images / "folder.jpg").mkdir()
    os.mkfifo(images / "fifo.jpg")  # no writer: reading it would block for ever
    (images / "gone.jpg").symlink_to("nowhere.jpg")
    names = ["good.png", "folder.jpg", "fifo.jpg", "gone.jpg", "absent.jpg"]
    out = tmp_path / "out"
    stats = build(_table(tmp_path / "c.csv", [[name, "a scene .", "train"] for name in names]), out, images=images)
    assert _csv_text(out / "problems.csv").splitlines()[1:] == [
        f'{images / "folder.jpg"},3,"not a file: a folder, not an image file (row dropped)"',
        f'{images / "fifo.jpg"},4,"not a file: a named pipe (FIFO), not a regular file (row dropped)"',
        f'{images / "gone.jpg"},5,"missing: a symlink to nowhere.jpg, which does not exist (row dropped)"',
        f"{images / 'absent.jpg'},6,missing: file not found (row dropped)",
    ]
    assert stats["image_checks"] == {"missing": 2, "not a file": 2}
    with pytest.raises(IsADirectoryError, match=r"^'.*folder\.jpg' is a folder, not an image file$"):
        load_image(images / "folder.jpg")
    with pytest.raises(OSError, match=r"^'.*fifo\.jpg' is a named pipe \(FIFO\), not a regular file$"):
        load_image(images / "fifo.jpg")


# --- memory: sizes and headers before whole reads (B04, B27) ---------------------------------------------------------


def _status(key: str) -> int:
    """A /proc/self/status value in KiB (VmRSS: resident now; VmHWM: the peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/self/status")


def _peak_growth_mib(function):
    """(what `function` returns, how far resident memory rose above its start while it ran, in MiB)."""
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the resident size now
    start = _status("VmRSS")
    result = function()
    return result, (_status("VmHWM") - start) / 1024


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(path: Path, width: int, height: int, bit_depth: int = 8, value: int = 0, idat: bytes | None = None) -> Path:
    """A grey PNG of one value, compressed row by row: a huge picture costs a small file and no memory here."""
    if idat is None:
        compressor = zlib.compressobj(9)
        row = b"\x00" + bytes([value]) * ((width * bit_depth + 7) // 8)
        idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    return path


def test_a_2gb_sparse_file_is_refused_from_its_header_without_reading_it(tmp_path):
    sparse = tmp_path / "sparse.jpg"
    with open(sparse, "wb") as file:
        file.truncate(2 * 2**30)  # 2 GiB of zeros that take no disk
    check, growth = _peak_growth_mib(lambda: check_image(sparse))
    assert (
        check.problem
        == "unreadable: UnidentifiedImageError: cannot identify image file (not an image format Pillow reads)"
    )
    assert growth < 64  # it read the whole file before (3.0 GB peak in the probe)

    def caption_time():
        with pytest.raises(UnidentifiedImageError) as error:
            load_image(sparse)
        return str(error.value)

    message, growth = _peak_growth_mib(caption_time)
    assert message == f"cannot identify image file '{sparse}'" and growth < 64

    (tmp_path / "images").mkdir()
    trailing = tmp_path / "images" / "trailing.png"
    Image.new("RGB", (64, 48), (10, 200, 30)).save(trailing)
    with open(trailing, "r+b") as file:
        file.truncate(2 * 2**30)  # a real PNG followed by 2 GiB: Pillow stops at IEND
    check, growth = _peak_growth_mib(lambda: check_image(trailing))
    assert (check.oversized, check.size, growth < 64) == (2 * 2**30, (64, 48), True)
    assert np.asarray(Image.open(io.BytesIO(check.data))).tolist() == np.asarray(load_image(trailing)).tolist()
    table = _table(tmp_path / "c.csv", [["trailing.png", "a field .", "train"]])
    stats = build(table, tmp_path / "out", images=tmp_path / "images")
    assert stats["image_checks"] == {"re-encoded: oversized file": 1}
    assert _csv_text(tmp_path / "out" / "problems.csv").splitlines()[1] == (
        f'{trailing},2,"re-encoded: the file has 2,147,483,648 bytes, far more than 64x48 pixels need '
        '(data after the picture?); the picture is stored re-encoded (row kept)"'
    )


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory) -> Path:
    """12000 x 12000 grey pixels (144 Mpx, above PIXEL_LIMIT): 168 KB on disk."""
    return _png(tmp_path_factory.mktemp("huge") / "huge.png", 12000, 12000, value=77)


def test_a_144_megapixel_png_is_downscaled_on_decode_with_bounded_memory(huge_png, tmp_path):
    image, growth = _peak_growth_mib(lambda: load_image(huge_png))
    assert image.size == (6000, 6000) and image.width * image.height <= PIXEL_LIMIT
    assert image.mode == "RGB" and image.getextrema() == ((77, 77),) * 3
    full_rgb = 12000 * 12000 * 4 / 2**20  # Pillow's RGB of the whole picture: 549 MiB (the probe's peak: 3.4 GB)
    assert growth < full_rgb / 2, growth
    table = _table(tmp_path / "c.csv", [["huge.png", "a grey field .", "train"]])
    stats = build(table, tmp_path / "out", images=huge_png.parent, num_workers=1)  # before: dropped as a bomb
    assert stats["image_checks"] == {"converted from mode L": 1, "downscaled": 1}
    assert _csv_text(tmp_path / "out" / "problems.csv").splitlines()[1:] == [
        f"{huge_png},2,converted: mode L to RGB (row kept)",
        f'{huge_png},2,"downscaled: 12000x12000 to 1024x1024 (--max-side 1024, row kept)"',
    ]
    stored = datasets.load_from_disk(str(tmp_path / "out" / "grouped"))["train"][0]["image"]
    assert stored.size == (1024, 1024) and stored.getextrema() == ((77, 77),) * 3


def test_decompression_bombs_are_still_refused(tmp_path):
    compressor = zlib.compressobj(9)
    one_bit = compressor.compress(b"\x00" * 2501 * 20000) + compressor.flush()
    bombs = {
        "one_bit.png": (_png(tmp_path / "one_bit.png", 20000, 20000, bit_depth=1, idat=one_bit), 400_000_000),
        "claims.png": (_png(tmp_path / "claims.png", 100000, 100000, idat=zlib.compress(b"\x00" * 64)), 10**10),
    }
    for path, pixels in bombs.values():
        expected = (
            f"Image size ({pixels} pixels) exceeds limit of {2 * Image.MAX_IMAGE_PIXELS} pixels, could be "
            "decompression bomb DOS attack. Refused. If the picture is real, downscale it first (e.g. gdal_translate "
            "-outsize 25% 25% IN OUT)."
        )
        with pytest.raises(Image.DecompressionBombError) as error:
            load_image(path)
        assert str(error.value) == expected
        assert (check_image(path).kind, check_image(path).problem) == ("too large", f"too large: {expected}")


def test_every_format_is_reduced_to_the_pixel_limit(tmp_path, monkeypatch):
    """The rules at a limit of 2,500 pixels, so that tiny files exercise them: JPEGs decode at reduced scale, other
    images are reduced after decoding (raster values exactly, every k-th pixel), and full decodes stop at twice it."""
    monkeypatch.setattr(decoding, "PIXEL_LIMIT", 2_500)
    monkeypatch.setattr(decoding, "FULL_DECODE_LIMIT", 5_000)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (100, 120, 3), dtype=np.uint8)).save(tmp_path / "big.jpg")
    jpeg = load_image(tmp_path / "big.jpg")
    assert jpeg.size == (30, 25)  # 1/4 scale (1/2 gives 3,000 pixels): the JPEG decoder's own, no full decode
    Image.fromarray(rng.integers(0, 256, (60, 70, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    assert load_image(tmp_path / "rgb.png").size == (35, 30)
    raster = rng.integers(0, 4096, (60, 70, 4), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "four.tif", raster)
    expected = decoding.bands_to_rgb(raster[::2, ::2])
    assert np.array_equal(np.asarray(load_image(tmp_path / "four.tif")), np.asarray(expected))
    check = check_image(tmp_path / "four.tif", max_side=1024)
    assert (check.downscaled_from, check.size) == ((70, 60), (35, 30))
    Image.fromarray(rng.integers(0, 256, (80, 80), dtype=np.uint8)).save(tmp_path / "over.png")
    with pytest.raises(Image.DecompressionBombError) as error:
        load_image(tmp_path / "over.png")
    assert str(error.value) == (
        "Image size (80x80 = 6,400 pixels) exceeds the limit of 5,000 pixels decoded in full: refused as a possible "
        "decompression bomb. If the picture is real, downscale it first (e.g. gdal_translate -outsize 25% 25% IN OUT)."
    )


# --- NaN and no-data pixels (B09, F17) -------------------------------------------------------------------------------


def _stretched(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The 2-98 percentile stretch of one band, its percentiles taken over the valid pixels only."""
    low, high = np.percentile(values[valid].astype(np.float64), [2, 98])
    return (np.clip((values - low) / (high - low), 0, 1) * 255 + 0.5).astype(np.uint8)


@pytest.mark.parametrize("bands", [1, 3], ids=["one band (Pillow)", "three bands (tifffile)"])
def test_nan_pixels_are_left_out_of_the_stretch_like_declared_nodata(tmp_path, bands):
    """Before: one NaN made np.percentile NaN and the whole picture black, in the dataset and at caption time."""
    rng = np.random.default_rng(bands)
    data = rng.normal(1000, 300, (40, 56, bands)).astype(np.float32)
    invalid = np.zeros((40, 56), bool)
    invalid[:6] = True  # a no-data collar
    invalid[20:24, 30:40] = True
    with_nan, with_fill = data.copy(), data.copy()
    with_nan[invalid] = np.nan
    with_nan[30, 5] = np.inf
    with_fill[invalid] = -9999
    with_fill[30, 5] = np.inf
    invalid[30, 5] = True
    options = {"photometric": "rgb"} if bands == 3 else {}
    tifffile.imwrite(tmp_path / "nan.tif", with_nan.squeeze(), **options)
    declared = [(GDAL_NODATA, "s", 0, "-9999", False)]
    tifffile.imwrite(tmp_path / "fill.tif", with_fill.squeeze(), extratags=declared, **options)
    from_nan = np.asarray(load_image(tmp_path / "nan.tif"))
    assert np.array_equal(from_nan, np.asarray(load_image(tmp_path / "fill.tif")))
    for band in range(3):
        expected = _stretched(data[:, :, band % bands], ~invalid)
        assert np.abs(from_nan[:, :, band].astype(int) - expected).max(where=~invalid, initial=0) <= 1
    assert (from_nan[invalid] == 0).all() and from_nan[~invalid].std() > 40  # a picture, not a black square
    with pytest.warns(rasterio.errors.NotGeoreferencedWarning):
        with rasterio.open(
            tmp_path / "rasterio.tif",
            "w",
            driver="GTiff",
            width=56,
            height=40,
            count=bands,
            dtype="float32",
            nodata=-9999,
        ) as raster:
            raster.write(np.moveaxis(with_fill, -1, 0))
    assert np.array_equal(np.asarray(load_image(tmp_path / "rasterio.tif")), from_nan)  # as GDAL declares it
    check = check_image(tmp_path / "nan.tif")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(check.data))), from_nan)  # the builder stores the same


def test_undeclared_fill_is_given_with_nodata_in_load_image_and_build(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(7)
    raster = rng.integers(2000, 9000, (48, 48, 3), dtype=np.uint16)
    raster[:, :10] = 0  # a Landsat-like collar, not declared in the file
    tifffile.imwrite(images / "collar.tif", raster, photometric="rgb")
    tifffile.imwrite(images / "declared.tif", raster, photometric="rgb", extratags=[(GDAL_NODATA, "s", 0, "0", False)])
    given = np.asarray(load_image(images / "collar.tif", nodata=0))
    assert np.array_equal(given, np.asarray(load_image(images / "declared.tif")))
    assert not np.array_equal(given, np.asarray(load_image(images / "collar.tif")))  # the collar skewed the stretch
    table = _table(tmp_path / "c.csv", [["collar.tif", "a field .", "train"]])
    argv = ["build", "--captions", str(table), "--images", str(images), "--output", str(tmp_path / "out")]
    assert _run([*argv, "--nodata", "0"], capsys)[0] == 0
    stored = datasets.load_from_disk(str(tmp_path / "out" / "grouped"))["train"][0]["image"]
    assert np.array_equal(np.asarray(stored), given)
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["nodata"] == 0


def test_an_image_without_any_valid_pixel_is_an_error_not_a_black_square(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    tifffile.imwrite(images / "all_nan.tif", np.full((16, 16), np.nan, np.float32))
    Image.new("RGB", (16, 16)).save(images / "black.png")
    Image.new("RGB", (16, 16), (90, 160, 40)).save(images / "good.png")
    with pytest.raises(NoValidPixelsError) as error:
        load_image(images / "all_nan.tif")
    assert str(error.value) == "no valid pixels: every value is NaN or infinite, so there is no picture to show"
    with pytest.raises(NoValidPixelsError) as error:
        load_image(images / "black.png", nodata=0)
    assert str(error.value) == (
        "no valid pixels: every value is NaN, infinite or the no-data value 0, so there is no picture to show"
    )
    rows = [[name, "a field .", "train"] for name in ("all_nan.tif", "good.png")]
    stats = build(_table(tmp_path / "c.csv", rows), tmp_path / "out", images=images)
    assert stats["image_checks"] == {"no valid pixels": 1}
    assert _csv_text(tmp_path / "out" / "problems.csv").splitlines()[1] == (
        f'{images / "all_nan.tif"},2,"no valid pixels: every value is NaN or infinite, so there is no picture to '
        'show (row dropped)"'
    )
    argv = ["build", "--captions", str(tmp_path / "c.csv"), "--output", str(tmp_path / "o2")]
    assert _run([*argv, "--images", str(images), "--nodata", "nan"], capsys) == (
        2,
        "error: --nodata nan is not a value pixels can be compared with: NaN and infinite values are always treated "
        "as no data. Expected a finite number such as 0 or -9999. Fix: pass that number, or leave --nodata out.\n",
    )
    assert _run([*argv, "--captions-only", "--nodata", "0"], capsys) == (
        2,
        "error: --nodata applies to images, but the build is captions only. Expected --images FOLDER. Fix: pass "
        "--images, or leave out --nodata.\n",
    )
    assert not (tmp_path / "o2").exists()
