"""The dataset card (`README.md`) of a built dataset, written from its `stats.json`."""

from __future__ import annotations

from pathlib import Path

COLUMNS = ("images", "captions_in", "duplicates_removed", "empties_removed", "pairs_out", "images_dropped")


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
            lines.append(f"| **{split}** | **all** | " + " | ".join(f"**{sum(r[c] for r in rows):,}**"
                                                                  for c in COLUMNS) + " |")
    return "\n".join(lines)


def card_text(stats: dict) -> str:
    splits = ", ".join(f"`{name}`" for name in stats["splits"])
    empty = ", ".join(f"`{name}`" for name in stats["empty_splits"]) or "none"
    columns = "`image` (datasets.Image), " if stats["with_images"] else ""
    checks = "\n".join(f"| {kind} | {count:,} |" for kind, count in stats["image_checks"].items()) or "| none | 0 |"
    size = stats["size_bytes"]
    score = stats.get("clip_score")
    score_section = "" if not score else (
        f"\n## CLIP screening\n\n`clip_score` = cosine similarity of image and caption embeddings from "
        f"`{score['model']}`: mean {score['mean']:.4f}, median {score['median']:.4f}, min {score['min']:.4f}. "
        f"Report: `clip_report/histogram.png`, `clip_report/lowest.png` (the {score['lowest']} lowest pairs), "
        "`clip_report/lowest.csv`.\n")
    return f"""---
pretty_name: Remote-sensing image captions (cleaned)
language:
- en
task_categories:
- image-to-text
tags:
- remote-sensing
- image-captioning
---

# Remote-sensing image captions, cleaned

Built by `python -m dataset_builder build` from `{stats['captions_file']}` ({stats['layout']} layout,
sha256 `{stats['captions_sha256'][:16]}`).

Cleaning, per image: captions equal after `strip().lower()` are duplicates, the first occurrence is kept in its
stripped form, empty captions are dropped. Rows follow the reference order within a split: every image's first kept
caption, then every image's second, and so on.

- Splits: {splits}. Empty splits, left out: {empty}.
- Columns: {columns}`image_id` (file name), `caption`, `source`, `split` (table name: train, val or test).
- `grouped/`: one row per image (`image_id`, `captions` list{', `image`' if stats['with_images'] else ''}) for
  multi-reference evaluation. `csv/{{train,val,test}}.csv`: `image,caption` in the reference format.
- `problems.csv`: every image that was dropped, converted or downscaled, with its table line and reason.

## Counts

{counts_table(stats['counts'])}

## Image checks

| check | images |
|---|---|
{checks}

## Size on disk

| part | size |
|---|---|
| pairs (save_to_disk) | {_size(size['pairs'])} |
| grouped | {_size(size['grouped'])} |
| csv | {_size(size['csv'])} |
| total | {_size(size['total'])} |

Each pair row carries its image bytes, so images are stored once per kept caption in the pairs folders and once
in `grouped/`.
{score_section}
## Use

```python
import datasets
pairs = datasets.load_from_disk("DIR")           # DatasetDict: {splits}
grouped = datasets.load_from_disk("DIR/grouped")  # one row per image
```
"""


def write_card(path: str | Path, stats: dict) -> None:
    Path(path).write_text(card_text(stats), encoding="utf-8")
