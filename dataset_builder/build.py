"""`build`: a caption table (+ images) -> a cleaned, de-duplicated `datasets.DatasetDict` with a report.

Output folder: the pair DatasetDict (save_to_disk), `csv/{train,val,test}.csv`, `grouped/` (one row per image),
`problems.csv`, `duplicates.csv` (every pair of copied images), `stats.json` and the dataset card `README.md`. See
the package README section for the layout.
"""

from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import partial
from itertools import combinations_with_replacement
from pathlib import Path

import datasets
import pyarrow as pa
from tqdm.auto import tqdm

from .atomic import atomic_directory, check_replaceable
from .card import write_card
from .cleaning import clean_captions, reference_order
from .duplicates import HASH_BITS, HASH_SIZE, NEAR_DISTANCE, find_duplicates
from .images import ImageCheck, check_image
from .tables import DATASET_SPLITS, TABLE_SPLITS, ImageRecord, read_caption_table

STATS_VERSION = 2
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


class StrictError(RuntimeError):
    """--strict and at least one image could not be used."""


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


def _check_images(paths: list[Path], max_side: int, num_workers: int):
    """Yield an ImageCheck per path, in order, using worker processes for real work."""
    worker = partial(check_image, max_side=max_side)
    progress = dict(total=len(paths), desc="checking images", unit="img", mininterval=1.0)
    if num_workers <= 1 or len(paths) < 64:
        yield from tqdm(map(worker, paths), **progress)
        return
    with multiprocessing.get_context("fork").Pool(num_workers) as pool:
        yield from tqdm(pool.imap(worker, paths, chunksize=8), **progress)


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


def _write_csv(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8", newline="") as file:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerows(rows)


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
) -> dict:
    """Build the dataset; `images=None` means captions only. Returns the stats written to `stats.json`.

    Duplicate images are always listed; `drop_eval_duplicates` also leaves out validation and test images that are
    exact or near copies of a training image, so that evaluation does not score pictures the model trained on.
    """
    output = Path(output)
    if drop_eval_duplicates and images is None:
        raise ValueError(
            "--drop-eval-duplicates needs the images, but the build is captions only. Expected --images FOLDER. "
            "Fix: pass --images, or leave out --drop-eval-duplicates."
        )
    check_replaceable(output)
    table = read_caption_table(captions, split=split, source=source)
    if images is not None and not Path(images).is_dir():
        raise FileNotFoundError(
            f"--images {images} is not a folder. Expected the folder holding the files named in "
            "the image column (RISCM: resized/). Fix: pass the right folder, or --captions-only."
        )
    entries = []
    for record in table.records:
        cleaned = clean_captions(record.captions)
        entries.append(_Image(record, cleaned.kept, cleaned.duplicates, cleaned.empties))

    problems: list[tuple[str, int, str]] = []
    image_checks: Counter = Counter()
    if images is not None:
        paths = [Path(images) / entry.record.image for entry in entries]
        for entry, path, check in zip(
            entries, paths, _check_images(paths, max_side, num_workers or os.cpu_count()), strict=True
        ):
            entry.check = check
            if check.problem:
                image_checks[check.kind] += 1
                problems.append((str(path), entry.record.line, f"{check.problem} (row dropped)"))
                continue
            if check.converted_from:
                image_checks[f"converted from {check.converted_from}"] += 1
                problems.append((str(path), entry.record.line, f"converted: {check.converted_from} to RGB (row kept)"))
            if check.downscaled_from:
                image_checks["downscaled"] += 1
                width, height = check.downscaled_from
                problems.append(
                    (
                        str(path),
                        entry.record.line,
                        f"downscaled: {width}x{height} to "
                        f"{check.size[0]}x{check.size[1]} (--max-side {max_side}, row kept)",
                    )
                )
        broken = [problem for problem in problems if problem[2].endswith("(row dropped)")]
        if strict and broken:
            listing = "\n".join(f"  {path} (line {line}): {reason}" for path, line, reason in broken)
            raise StrictError(
                f"--strict: {len(broken)} of {len(entries)} images cannot be used:\n{listing}\n"
                "Fix the files, or run without --strict to leave these rows out (they are listed in "
                "problems.csv)."
            )
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

    digest = hashlib.sha256(Path(captions).read_bytes())
    digest.update(json.dumps([images is not None, max_side, split, source, drop_eval_duplicates]).encode())
    for entry in entries:
        if entry.check is not None and entry.check.sha256:
            digest.update(entry.check.sha256.encode())
    fingerprint = digest.hexdigest()

    with atomic_directory(output) as work:
        pair_splits, grouped_splits, empty_splits = {}, {}, []
        (work / "csv").mkdir()
        scratch = work / "_scratch"
        scratch.mkdir()
        for table_split in TABLE_SPLITS:
            members = by_split[table_split]
            pairs = reference_order([entry.kept for entry in members])
            _write_csv(
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
        if not pair_splits:
            raise ValueError(
                f"{captions}: no image has a usable caption and image, so there is nothing to save. "
                "Expected at least one. Fix: see the problems listed above."
            )
        datasets.DatasetDict(pair_splits).save_to_disk(str(work))
        datasets.DatasetDict(grouped_splits).save_to_disk(str(work / "grouped"))
        pair_splits.clear()
        grouped_splits.clear()
        for leftover in scratch.iterdir():
            leftover.unlink()
        scratch.rmdir()
        _write_csv(work / "problems.csv", [("path", "row", "reason")] + problems)
        if images is not None:
            _write_csv(work / "duplicates.csv", [DUPLICATE_COLUMNS] + duplicate_rows)
        stats = {
            "builder": f"dataset_builder/{STATS_VERSION}",
            "captions_file": Path(captions).name,
            "captions_sha256": hashlib.sha256(Path(captions).read_bytes()).hexdigest(),
            "layout": table.layout,
            "line_ending": table.line_ending,
            "with_images": images is not None,
            "max_side": max_side if images is not None else None,
            "fingerprint": fingerprint,
            "splits": [name for name in DATASET_SPLITS.values() if name not in empty_splits],
            "empty_splits": empty_splits,
            "counts": [
                {"split": key[0], "source": key[1], **{f: counts[key][f] for f in COUNT_FIELDS}}
                for key in sorted(counts, key=lambda key: (TABLE_SPLITS.index(key[0]), key[1]))
            ],
            "image_checks": dict(sorted(image_checks.items())),
            "duplicates": duplicates,
            "problems": len(problems),
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
