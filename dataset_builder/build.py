"""`build`: a caption table (+ images) -> a cleaned, de-duplicated `datasets.DatasetDict` with a report.

Output folder: the pair DatasetDict (save_to_disk), `csv/{train,val,test}.csv`, `grouped/` (one row per image),
`problems.csv`, `duplicates.csv` (every pair of copied images), `stats.json`, the dataset card `README.md` and the
record `cnngemma_output.json`. See the package README section for the layout. Only files that resolve inside
`--images` are read; an existing `--output` is replaced only when it is an earlier build's (`cnngemma.outputs`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import multiprocessing
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import partial
from itertools import combinations_with_replacement
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
from PIL import Image
from tqdm.auto import tqdm

from cnngemma.errors import UsageError
from cnngemma.outputs import check_replaceable, no_space_message, replace_folder
from modeling_cnngemma.image_processing_cnngemma import PIXEL_LIMIT

from .card import write_card
from .cleaning import clean_captions, describe_invisible, normalise, reference_order
from .duplicates import HASH_BITS, HASH_SIZE, NEAR_DISTANCE, find_duplicates
from .images import ImageCheck, check_image, missing
from .tables import DATASET_SPLITS, TABLE_SPLITS, ImageRecord, read_caption_table, write_csv

__all__ = ["TOOL", "StrictError", "UsageError", "build", "build_layout", "write_errors"]

STATS_VERSION = 3
MIN_MAX_SIDE = 32  # smaller images hold too little for a caption, and resizing to 0 pixels fails
LONG_CAPTION_RULE = "max(300, 4 x the 99th percentile of kept caption lengths)"
COUNT_FIELDS = (
    "images",
    "captions_in",
    "duplicates_removed",
    "empties_removed",
    "pairs_out",
    "images_dropped",
    "pairs_dropped",
)
DUPLICATE_COLUMNS = (
    "image",
    "split",
    "row",
    "duplicate_of",
    "duplicate_of_split",
    "duplicate_of_row",
    "kind",  # exact: same stored bytes; near: perceptual hashes at most duplicates.NEAR_DISTANCE bits apart
    "distance",  # Hamming distance of the perceptual hashes, in bits
    "outcome",  # kept, or dropped by --drop-eval-duplicates
)
CHUNK = 1024  # pair rows per Arrow write when images are copied
TOOL = "dataset_builder build"  # the name in the output's record; `score` rewrites a build under it too
# The files of a build output, for earlier versions' outputs without a record: save_to_disk's split folders, the
# listings, grouped/ and an earlier `score`'s report
_LAYOUT = re.compile(
    r"(dataset_dict\.json|stats\.json|README\.md|problems\.csv|duplicates\.csv|csv/[^/]+\.csv"
    r"|(train|validation|test)/(data-\d{5}-of-\d{5}\.arrow|dataset_info\.json|state\.json)|grouped/.+"
    r"|clip_report/(histogram\.png|lowest\.png|lowest\.csv))"
)


class StrictError(RuntimeError):
    """--strict and at least one image could not be used."""


def build_layout(folder: Path) -> list[str] | None:
    """The files an earlier version of `build` (or `score`) wrote in `folder`, or None if it is no build output: one
    has dataset_dict.json and a stats.json whose "builder" starts with "dataset_builder/"."""
    try:
        stats = json.loads((folder / "stats.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    builder = stats.get("builder") if isinstance(stats, dict) else None
    if not (folder / "dataset_dict.json").is_file() or not str(builder).startswith("dataset_builder/"):
        return None
    names = (path.relative_to(folder).as_posix() for path in folder.rglob("*") if not path.is_dir())
    return [name for name in names if _LAYOUT.fullmatch(name)]


def pair_features(with_images: bool) -> datasets.Features:
    columns = {"image": datasets.Image()} if with_images else {}
    columns.update({name: datasets.Value("string") for name in ("image_id", "caption", "source", "split")})
    return datasets.Features(columns)


def grouped_features(with_images: bool) -> datasets.Features:
    columns = {"image": datasets.Image()} if with_images else {}
    columns.update(
        {
            "image_id": datasets.Value("string"),
            "captions": datasets.List(datasets.Value("string")),
            "source": datasets.Value("string"),
        }
    )
    return datasets.Features(columns)


@dataclass
class _Image:
    record: ImageRecord
    kept: tuple[str, ...]
    duplicates: int
    empties: int
    check: ImageCheck | None = None
    duplicate_of: _Image | None = None  # the training image it copies, when dropped by --drop-eval-duplicates


def _resolve_inside(root: Path, name: str) -> tuple[Path | None, ImageCheck | None]:
    """The file that `name` names under the resolved folder `root`, symlinks followed, or why it is not read.

    Only files that resolve inside `root` are read: a table naming `../x`, an absolute path or a symlink that leads
    out of the folder must not put other files into the dataset (which `push` uploads).
    """
    path = os.path.join(root, name)
    try:
        if os.path.basename(name) == name and name not in (".", "..") and not os.path.islink(path):
            return Path(path), None  # a plain entry of a resolved folder: one lstat, not one per path component
        resolved = Path(path).resolve()
    except (OSError, RuntimeError) as error:  # a name too long for the file system; RuntimeError: a symlink loop
        return None, ImageCheck(data=None, problem=f"unreadable: {error}", kind="unreadable")
    if not resolved.is_relative_to(root):
        reason = (
            f"outside --images: {name!r} resolves to {resolved}, which is not inside {root}; "
            "only files inside --images are read"
        )
        return None, ImageCheck(data=None, problem=reason, kind="outside")
    if os.path.islink(path) and not os.path.exists(resolved):
        return None, missing(Path(path))
    return resolved, None


@contextlib.contextmanager
def write_errors(flag: str, folder: Path):
    """A full disk, a quota or a file-size limit hit while the output is written: one line (the earlier output is
    untouched: it is replaced only once the new one is complete)."""
    try:
        yield
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise no_space_message(error, f"writing {flag} {folder}") from None
        raise


def _check_one(name: str, root: Path, max_side: int, nodata: float | None) -> tuple[ImageCheck, str | None]:
    """`check_image` of the file `name` names inside `root`, and the format of a file whose stored bytes differ from
    it for no reason `check_image` gives (an RGB WebP, BMP or TIFF is re-encoded as PNG: it is listed all the same).
    """
    path, refused = _resolve_inside(root, name)
    if refused is not None:
        return refused, None
    try:
        check = check_image(path, max_side=max_side, nodata=nodata)
    except OSError as error:  # no read permission, a name too long: this row is listed, the build goes on
        return ImageCheck(data=None, problem=f"unreadable: {error}", kind="unreadable"), None
    if check.data is None or check.converted_from or check.downscaled_from or check.oversized:
        return check, None
    with open(path, "rb") as file:  # a re-encoded file differs from the stored bytes in size or in its first bytes
        if os.fstat(file.fileno()).st_size == len(check.data) and check.data.startswith(file.read(64)):
            return check, None
    try:
        with Image.open(path) as image:
            return check, image.format or "unknown format"
    except (OSError, ValueError):
        return check, "unknown format"


def _check_images(names: list[str], root: Path, max_side: int, num_workers: int, nodata: float | None = None):
    """Yield (ImageCheck, re-encoded format) per image name, in order, using worker processes for real work."""
    worker = partial(_check_one, root=root, max_side=max_side, nodata=nodata)
    progress = dict(total=len(names), desc="checking images", unit="img", mininterval=1.0)
    if num_workers <= 1 or len(names) < 64:
        yield from tqdm(map(worker, names), **progress)
        return
    with multiprocessing.get_context("fork").Pool(num_workers) as pool:
        yield from tqdm(pool.imap(worker, names, chunksize=8), **progress)


def _image_column(checks: list[ImageCheck], names: list[str]) -> pa.Array:
    return pa.StructArray.from_arrays(
        [pa.array([c.data for c in checks], pa.binary()), pa.array(names, pa.string())], names=["bytes", "path"]
    )


def _write_arrow(path: Path, features: datasets.Features, tables) -> datasets.table.MemoryMappedTable:
    with datasets.arrow_writer.ArrowWriter(features=features, path=str(path)) as writer:
        for table in tables:
            writer.write_table(table)
        writer.finalize()
    return datasets.table.MemoryMappedTable.from_file(str(path))


def _folder_size(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def _find_duplicates(entries: list[_Image], folder: Path, drop_eval: bool, problems: list) -> tuple[list, dict]:
    """Every exact or near-duplicate pair among `entries`, as duplicates.csv rows, and the counts per split pair.

    Each pair is also listed in `problems`. With `drop_eval`, validation and test images that copy a training image
    are dropped, the row naming the earliest training image they copy.
    """
    # Training images first: the earlier image of a cross-split pair is then the training one. sorted() is stable,
    # so table order holds within a split.
    ordered = sorted(entries, key=lambda entry: TABLE_SPLITS.index(entry.record.split))
    pairs = find_duplicates([entry.check.sha256 for entry in ordered], [entry.check.phash for entry in ordered])
    counts = {f"{a}-{b}": {"exact": 0, "near": 0} for a, b in combinations_with_replacement(TABLE_SPLITS, 2)}
    dropped, rows = Counter(), []
    # Pairs come sorted by their later image, then the earlier one: an image's first pair names its earliest copy,
    # and whether it is dropped is settled before it appears as the earlier image of a pair.
    for pair in pairs:
        first, second = ordered[pair.first], ordered[pair.second]
        kind = "exact" if pair.exact else "near"
        counts[f"{first.record.split}-{second.record.split}"][kind] += 1
        drops = drop_eval and first.record.split == "train" and second.record.split != "train"
        drops = drops and second.duplicate_of is None  # its first pair names its earliest training copy
        if drops:
            second.duplicate_of = first
            dropped[second.record.split] += 1
        how = "same stored bytes" if pair.exact else f"phash distance {pair.distance} of {HASH_BITS} bits"
        dropped_row = second.duplicate_of is not None
        outcome = "--drop-eval-duplicates (row dropped)" if dropped_row else "listed only (row kept)"
        problems.append(
            (
                str(folder / second.record.image),
                second.record.line,
                f"{kind} duplicate of {first.record.split} image {first.record.image} (line {first.record.line}, "
                f"{how}): {outcome}",
            )
        )
        rows.append(
            (
                second.record.image,
                second.record.split,
                second.record.line,
                first.record.image,
                first.record.split,
                first.record.line,
                kind,
                pair.distance,
                "kept" if second.duplicate_of is None else "dropped",
            )
        )
    stats = {
        "hash": f"imagehash.phash(hash_size={HASH_SIZE}), {HASH_BITS} bits",
        "near_distance": NEAR_DISTANCE,
        "pairs": counts,
        "drop_eval_duplicates": drop_eval,
        "images_dropped": {split: dropped[split] for split in TABLE_SPLITS[1:]},
    }
    return rows, stats


def _check_arguments(
    captions, output: Path, images, max_side: int, num_workers: int | None, drop_eval: bool, nodata: float | None
) -> None:
    """Every check that needs no reading: values in range, and an output that can be replaced without losing data."""
    if max_side < MIN_MAX_SIDE:
        raise UsageError(
            f"--max-side {max_side} is too small. Expected at least {MIN_MAX_SIDE} pixels. "
            f"Fix: pass --max-side {MIN_MAX_SIDE} or more (default 1024)."
        )
    if num_workers is not None and num_workers < 1:
        raise UsageError(
            f"--num-workers {num_workers} is not a number of processes. Expected 1 or more. "
            "Fix: pass --num-workers 1 to check images in this process, or leave it out to use every CPU core."
        )
    if nodata is not None and not math.isfinite(nodata):
        raise UsageError(
            f"--nodata {nodata} is not a value pixels can be compared with: NaN and infinite values are always "
            "treated as no data. Expected a finite number such as 0 or -9999. Fix: pass that number, or leave "
            "--nodata out."
        )
    if nodata is not None and images is None:
        raise UsageError(
            "--nodata applies to images, but the build is captions only. Expected --images FOLDER. Fix: pass "
            "--images, or leave out --nodata."
        )
    if drop_eval and images is None:
        raise UsageError(
            "--drop-eval-duplicates needs the images, but the build is captions only. Expected --images FOLDER. "
            "Fix: pass --images, or leave out --drop-eval-duplicates."
        )
    target = output.resolve()
    if Path(captions).resolve().is_relative_to(target):
        raise UsageError(
            f"--captions {captions} is inside --output {output}, which the build replaces. Expected a table "
            "outside the output folder. Fix: copy the table elsewhere, or choose another --output."
        )
    if images is not None:
        folder = Path(images).resolve()
        if target.is_relative_to(folder):
            raise UsageError(
                f"--output {output} is inside --images {images}. Expected an output folder outside the images, "
                "which the build only reads. Fix: choose an --output outside that folder."
            )
        if folder.is_relative_to(target):
            raise UsageError(
                f"--images {images} is inside --output {output}, which the build replaces. Expected the images "
                "outside the output folder. Fix: move the images, or choose another --output."
            )
    if output.exists() and not output.is_dir():
        raise UsageError(
            f"--output {output} is a file. Expected a folder: a new or empty one, or an earlier output to replace. "
            "Fix: choose another --output; a file is never replaced."
        )
    check_replaceable(output, TOOL, build_layout, "--output")  # by the record's names: no hashing before the work
    if images is not None and not Path(images).is_dir():
        raise FileNotFoundError(
            f"--images {images} is not a folder. Expected the folder holding the files named in "
            "the image column (RISCM: resized/). Fix: pass the right folder, or --captions-only."
        )


def _long_captions(entries: list[_Image], name_of) -> tuple[int, list[tuple[str, int, str]]]:
    """The length above which a kept caption is very long for this dataset, and a problems.csv row for each one.

    The limit is LONG_CAPTION_RULE; 'lower' makes the percentile a caption length that occurs, so that in a small
    dataset one outlier does not raise the limit above itself.
    """
    lengths = [len(text) for entry in entries for text in entry.kept]
    limit = max(300, 4 * int(np.percentile(lengths, 99, method="lower")))
    rows = []
    for entry in entries:
        for text in entry.kept:
            if len(text) > limit:
                # the kept caption is the stripped first occurrence: its number is that of the first equal caption
                number = next(k for k, caption in enumerate(entry.record.captions) if normalise(caption) == text)
                rows.append(
                    (
                        name_of(entry),
                        entry.record.caption_lines[number],
                        f"caption {number + 1} is {len(text)} characters, very long for this dataset "
                        f"(over {limit}): listed only (row kept)",
                    )
                )
    return limit, rows


def build(
    captions: str | Path,
    output: str | Path,
    images: str | Path | None = None,
    split: str | None = None,
    source: str | None = None,
    max_side: int = 1024,
    strict: bool = False,
    num_workers: int | None = None,
    drop_eval_duplicates: bool = False,
    nodata: float | None = None,
) -> dict:
    """Build the dataset; `images=None` means captions only. Returns the stats written to `stats.json`.

    Duplicate images are always listed; `drop_eval_duplicates` also leaves out validation and test images that are
    exact or near copies of a training image, so that evaluation does not score pictures the model trained on.
    Images are read only where they resolve inside `images`; any other name is listed as a problem. `nodata`: a
    pixel value that marks missing data in images that do not declare one (`load_image`'s argument).
    """
    output = Path(output)
    _check_arguments(captions, output, images, max_side, num_workers, drop_eval_duplicates, nodata)
    table = read_caption_table(captions, split=split, source=source)
    entries, invisible_rows = [], []
    for record in table.records:
        cleaned = clean_captions(record.captions)
        entries.append(_Image(record, cleaned.kept, cleaned.duplicates, cleaned.empties))
        for number in cleaned.invisible:  # a blank caption shows as blank; these look filled in the table
            invisible_rows.append(
                (
                    record.image,
                    record.caption_lines[number],
                    f"caption {number + 1} holds only invisible characters "
                    f"({describe_invisible(normalise(record.captions[number]))}): dropped as an empty caption",
                )
            )
    if not any(entry.kept for entry in entries):
        raise ValueError(
            f"{captions}: all {sum(len(entry.record.captions) for entry in entries)} captions of its "
            f"{len(entries)} images are empty, so there is nothing to build. Expected at least one non-empty "
            "caption. Fix: check that the caption columns hold the captions, or export the table again."
        )

    def name_of(entry: _Image) -> str:
        return entry.record.image if images is None else str(Path(images) / entry.record.image)

    problems: list[tuple[str, int, str]] = []
    image_checks: Counter = Counter()
    if images is not None:
        names = [entry.record.image for entry in entries]
        workers = num_workers if num_workers is not None else os.cpu_count()
        checked = _check_images(names, Path(images).resolve(), max_side, workers, nodata)
        for entry, (check, reencoded_from) in zip(entries, checked, strict=True):
            entry.check = check
            where, line = name_of(entry), entry.record.line
            if check.problem:
                image_checks[check.kind] += 1
                problems.append((where, line, f"{check.problem} (row dropped)"))
                continue
            if check.converted_from:
                image_checks[f"converted from {check.converted_from}"] += 1
                problems.append((where, line, f"converted: {check.converted_from} to RGB (row kept)"))
            if reencoded_from:
                stored = "PNG" if check.data.startswith(b"\x89PNG") else "JPEG"
                image_checks[f"converted from {reencoded_from}"] += 1
                problems.append((where, line, f"converted: {reencoded_from} stored as {stored} (row kept)"))
            if check.oversized:
                image_checks["re-encoded: oversized file"] += 1
                problems.append(
                    (
                        where,
                        line,
                        f"re-encoded: the file has {check.oversized:,} bytes, far more than {check.size[0]}x"
                        f"{check.size[1]} pixels need (data after the picture?); the picture is stored re-encoded "
                        "(row kept)",
                    )
                )
            if check.downscaled_from:
                image_checks["downscaled"] += 1
                width, height = check.downscaled_from
                cap = f"--max-side {max_side}" if max(width, height) > max_side else f"over {PIXEL_LIMIT:,} pixels"
                problems.append(
                    (where, line, f"downscaled: {width}x{height} to {check.size[0]}x{check.size[1]} ({cap}, row kept)")
                )
        broken = [problem for problem in problems if problem[2].endswith("(row dropped)")]
        if strict and broken:
            listing = "\n".join(f"  {path} (line {line}): {reason}" for path, line, reason in broken)
            raise StrictError(
                f"--strict: {len(broken)} of {len(entries)} images cannot be used:\n{listing}\n"
                "Fix the files, or run without --strict to leave these rows out (they are listed in "
                "problems.csv)."
            )
    problems += invisible_rows
    for entry in entries:
        usable = entry.check is None or entry.check.data is not None
        if usable and not entry.kept:
            problems.append(
                (
                    entry.record.image,
                    entry.record.line,
                    f"no captions: all {len(entry.record.captions)} captions are empty (row dropped)",
                )
            )
    duplicates, duplicate_rows = None, []
    if images is not None:
        # Only images that reach the output can leak between splits; broken or caption-less ones are already out.
        usable = [entry for entry in entries if entry.check.data is not None and entry.kept]
        duplicate_rows, duplicates = _find_duplicates(usable, Path(images), drop_eval_duplicates, problems)

    counts: dict[tuple[str, str], Counter] = defaultdict(Counter)
    by_split: dict[str, list[_Image]] = {name: [] for name in TABLE_SPLITS}
    kept: list[_Image] = []  # in table order
    for entry in entries:
        count = counts[entry.record.split, entry.record.source]
        count["images"] += 1
        count["captions_in"] += len(entry.record.captions)
        count["duplicates_removed"] += entry.duplicates
        count["empties_removed"] += entry.empties
        if entry.check is not None and entry.check.data is None or not entry.kept or entry.duplicate_of is not None:
            count["images_dropped"] += 1
            count["pairs_dropped"] += len(entry.kept)
            continue
        count["pairs_out"] += len(entry.kept)
        by_split[entry.record.split].append(entry)
        kept.append(entry)
    if not kept:  # with images only: a captions-only build keeps every image with a caption
        reasons = Counter(entry.check.kind for entry in entries if entry.check.data is None)
        reasons["with only empty captions"] = sum(not entry.kept for entry in entries if entry.check.data is not None)
        listing = ", ".join(f"{count} {reason}" for reason, count in reasons.items() if count)
        raise ValueError(
            f"{captions}: none of its {len(entries)} images can be used ({listing}), so there is nothing to build. "
            f"Expected at least one readable image inside --images {images} with a non-empty caption. "
            "Fix: check that --images is the folder the image column names; --strict lists every unusable image."
        )
    long_limit, long_rows = _long_captions(kept, name_of)
    problems += long_rows
    warnings = []  # one line each, printed by the command line and kept in stats.json
    if long_rows:
        warnings.append(
            f"very long captions for this dataset (over {long_limit} characters): {len(long_rows)} of "
            f"{sum(len(entry.kept) for entry in kept)}, kept and listed in problems.csv"
        )
    if not by_split["train"]:
        in_table = sum(entry.record.split == "train" for entry in entries)
        warnings.append(
            f"the train split is empty: no train image is left (dropped: {in_table}, see problems.csv), so this "
            "output cannot train a model"
            if in_table
            else "the train split is empty: the table has no train rows (an evaluation-only build)"
        )

    digest = hashlib.sha256(table.sha256.encode())
    settings = [images is not None, max_side, split, source, drop_eval_duplicates]
    digest.update(json.dumps(settings + ([nodata] if nodata is not None else [])).encode())
    for entry in entries:
        if entry.check is not None and entry.check.sha256:
            digest.update(entry.check.sha256.encode())
    fingerprint = digest.hexdigest()

    with write_errors("--output", output), replace_folder(output, TOOL, legacy=build_layout, flag="--output") as work:
        pair_splits, grouped_splits, empty_splits = {}, {}, []
        (work / "csv").mkdir()
        scratch = work / "_scratch"
        scratch.mkdir()
        for table_split in TABLE_SPLITS:
            members = by_split[table_split]
            pairs = reference_order([entry.kept for entry in members])
            write_csv(
                work / "csv" / f"{table_split}.csv",
                [("image", "caption")] + [(members[index].record.image, text) for index, text in pairs],
            )
            if not members:
                empty_splits.append(DATASET_SPLITS[table_split])
                continue
            index = pa.array([index for index, _ in pairs], pa.int64())
            names = pa.array([entry.record.image for entry in members], pa.string())
            sources = pa.array([entry.record.source for entry in members], pa.string())
            grouped = {
                "image_id": names,
                "captions": pa.array([list(entry.kept) for entry in members]),
                "source": sources,
            }
            pair_columns = {
                "image_id": names.take(index),
                "caption": pa.array([text for _, text in pairs], pa.string()),
                "source": sources.take(index),
                "split": pa.array([table_split] * len(pairs), pa.string()),
            }
            if images is not None:
                grouped = {"image": _image_column([e.check for e in members], names.to_pylist()), **grouped}
            pair_table = pa.table(pair_columns)
            grouped_table = pa.table(grouped, schema=grouped_features(images is not None).arrow_schema)
            if images is not None:
                # Image bytes go to disk once, in the grouped table; pair rows take them from its memory map in
                # chunks, so memory stays flat however large the dataset is.
                grouped_table = _write_arrow(
                    scratch / f"grouped-{table_split}.arrow", grouped_features(True), [grouped_table]
                )
                images_column = grouped_table.column("image")
                chunks = (
                    pa.table(
                        {
                            "image": images_column.take(index[start : start + CHUNK]),
                            **{key: pair_table.column(key).slice(start, CHUNK) for key in pair_columns},
                        },
                        schema=pair_features(True).arrow_schema,
                    )
                    for start in range(0, len(pairs), CHUNK)
                )
                pair_table = _write_arrow(scratch / f"pairs-{table_split}.arrow", pair_features(True), chunks)
            else:
                pair_table = datasets.table.InMemoryTable(pair_table.cast(pair_features(False).arrow_schema))
                grouped_table = datasets.table.InMemoryTable(grouped_table)
            name = DATASET_SPLITS[table_split]
            grouped_splits[name] = datasets.Dataset(grouped_table, fingerprint=f"{fingerprint}-grouped-{name}")
            pair_splits[name] = datasets.Dataset(pair_table, fingerprint=f"{fingerprint}-pairs-{name}")
        datasets.DatasetDict(pair_splits).save_to_disk(str(work))
        datasets.DatasetDict(grouped_splits).save_to_disk(str(work / "grouped"))
        pair_splits.clear()
        grouped_splits.clear()
        for leftover in scratch.iterdir():
            leftover.unlink()
        scratch.rmdir()
        write_csv(work / "problems.csv", [("path", "row", "reason")] + problems)
        if images is not None:
            write_csv(work / "duplicates.csv", [DUPLICATE_COLUMNS] + duplicate_rows)
        stats = {
            "builder": f"dataset_builder/{STATS_VERSION}",
            "captions_file": Path(captions).name,
            "captions_sha256": table.sha256,
            "layout": table.layout,
            "line_ending": table.line_ending,
            "encoding": table.encoding,
            "with_images": images is not None,
            "max_side": max_side if images is not None else None,
            "nodata": nodata,
            "fingerprint": fingerprint,
            "splits": [name for name in DATASET_SPLITS.values() if name not in empty_splits],
            "empty_splits": empty_splits,
            "counts": [
                {"split": key[0], "source": key[1], **{f: counts[key][f] for f in COUNT_FIELDS}}
                for key in sorted(counts, key=lambda key: (TABLE_SPLITS.index(key[0]), key[1]))
            ],
            "image_checks": dict(sorted(image_checks.items())),
            "duplicates": duplicates,
            "long_captions": {"rule": LONG_CAPTION_RULE, "limit": long_limit, "captions": len(long_rows)},
            "problems": len(problems),
            "warnings": warnings,
            "size_bytes": {
                "pairs": sum(_folder_size(work / name) for name in DATASET_SPLITS.values() if (work / name).is_dir()),
                "grouped": _folder_size(work / "grouped"),
                "csv": _folder_size(work / "csv"),
            },
        }
        stats["size_bytes"]["total"] = sum(stats["size_bytes"].values())
        (work / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
        write_card(work / "README.md", stats)
    return stats
