"""The dataset card (`README.md`) of a built dataset: values from its `stats.json`, prose from
`templates/dataset_card.md`, rendered by huggingface_hub's `DatasetCard.from_template`."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import DatasetCard, DatasetCardData

COLUMNS = ("images", "captions_in", "duplicates_removed", "empties_removed", "pairs_out", "images_dropped")
TEMPLATE = Path(__file__).with_name("templates") / "dataset_card.md"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    raise AssertionError("unreachable")


def counts_table(counts: list[dict]) -> str:
    """A Markdown table of the cleaning counts per split and source, with a total row per split."""
    lines = ["| split | source | " + " | ".join(COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 2)]
    for split in dict.fromkeys(row["split"] for row in counts):
        rows = [row for row in counts if row["split"] == split]
        for row in rows:
            lines.append(f"| {split} | {row['source']} | " + " | ".join(f"{row[c]:,}" for c in COLUMNS) + " |")
        if len(rows) > 1:
            totals = " | ".join(f"**{sum(r[c] for r in rows):,}**" for c in COLUMNS)
            lines.append(f"| **{split}** | **all** | {totals} |")
    return "\n".join(lines)


def duplicates_rows(duplicates: dict | None) -> str:
    """Markdown table rows of exact and near-duplicate image pairs per split pair ("" for a captions-only build)."""
    if not duplicates:
        return ""
    return "\n".join(
        f"| {splits} | {count['exact']:,} | {count['near']:,} |" for splits, count in duplicates["pairs"].items()
    )


def dataset_card(stats: dict) -> DatasetCard:
    data = DatasetCardData(
        pretty_name="Remote-sensing image captions (cleaned)",
        language=["en"],
        task_categories=["image-to-text"],
        tags=["remote-sensing", "image-captioning"],
    )
    checks = stats["image_checks"].items()
    return DatasetCard.from_template(
        data,
        template_path=str(TEMPLATE),
        captions_file=stats["captions_file"],
        layout=stats["layout"],
        captions_sha256=stats["captions_sha256"],
        splits=", ".join(f"`{name}`" for name in stats["splits"]),
        empty_splits=", ".join(f"`{name}`" for name in stats["empty_splits"]) or "none",
        with_images=stats["with_images"],
        counts_table=counts_table(stats["counts"]),
        long_captions=stats.get("long_captions"),  # absent from outputs of earlier builder versions
        image_checks_rows="\n".join(f"| {kind} | {count:,} |" for kind, count in checks) or "| none | 0 |",
        sizes={part: _size(size) for part, size in stats["size_bytes"].items()},
        duplicates=stats.get("duplicates"),
        duplicates_rows=duplicates_rows(stats.get("duplicates")),
        clip_score=stats.get("clip_score"),
    )


def write_card(path: str | Path, stats: dict) -> None:
    dataset_card(stats).save(path)
