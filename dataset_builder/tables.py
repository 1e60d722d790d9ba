"""Reading and validating caption tables: RISCM's raw layout or the long layout.

Every problem with a table is a `TableError` naming the file, the line and the column, what was found, what was
expected and how to fix it. Nothing is guessed or silently repaired.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

RAW_COLUMNS = ("source", "split", "image")
LONG_REQUIRED = ("image", "caption")
LONG_OPTIONAL = ("split", "source")
SPLIT_ALIASES = {"train": "train", "val": "val", "validation": "val", "test": "test"}
TABLE_SPLITS = ("train", "val", "test")
DATASET_SPLITS = {"train": "train", "val": "validation", "test": "test"}
DEFAULT_SOURCE = "unknown"
_CAPTION_N = re.compile(r"caption_(\d+)")


class TableError(ValueError):
    """A caption table that cannot be read as it is; the message says where, what and how to fix it."""

    def __init__(self, path, line: int, column: str | None, received: str, expected: str, fix: str):
        where = f"{path}, line {line}" + (f", column {column}" if column else "")
        super().__init__(f"{where}: {received}. Expected {expected}. Fix: {fix}")


@dataclass
class ImageRecord:
    """One image of the table with its captions in table order; `line` is where it first appears."""

    image: str
    split: str
    source: str
    line: int
    captions: list[str] = field(default_factory=list)


@dataclass
class CaptionTable:
    path: Path
    layout: str  # "raw" or "long"
    line_ending: str  # "LF" or "CRLF"
    records: list[ImageRecord]


def _column_label(index: int, name: str) -> str:
    return f"{index + 1} ({name!r})"


def _decode(path: Path, raw: bytes) -> tuple[str, str]:
    """Return the table text with LF line endings, and the line ending found ("LF" or "CRLF")."""
    if not raw.strip():
        raise TableError(
            path,
            1,
            None,
            "the file is empty",
            "a header line such as 'source,split,image,caption_1,...,caption_5' or 'image,caption'",
            "export the table again",
        )
    for bom, name in ((codecs.BOM_UTF8, "UTF-8"), (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16")):
        if raw.startswith(bom):
            raise TableError(
                path,
                1,
                "1",
                f"the file starts with a {name} byte-order mark (BOM)",
                "plain UTF-8 without a BOM",
                "save it as 'CSV UTF-8' without BOM, e.g. "
                "python -c \"import sys;p=sys.argv[1];open(p,'w',encoding='utf-8',newline='')"
                ".write(open(p,encoding='utf-8-sig').read())\" FILE",
            )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        line_start = raw.rfind(b"\n", 0, error.start) + 1
        prefix = raw[line_start : error.start].decode("utf-8", errors="replace")
        column = len(next(csv.reader([prefix]), [""]))
        raise TableError(
            path,
            line,
            str(column),
            f"byte {raw[error.start : error.start + 1]!r} is not valid UTF-8 (byte offset {error.start})",
            "UTF-8 text",
            "convert the file, e.g. iconv -f latin1 -t utf-8 FILE > FILE.utf8",
        ) from None
    # RISCM's own raw table uses CRLF line endings throughout: that is accepted, normalised and reported.
    # Mixed endings or a bare CR mean an edited or corrupted file and are an error.
    if "\r" not in text:
        return text, "LF"
    lines = text.split("\n")
    first_ending = "CRLF" if lines[0].endswith("\r") and len(lines) > 1 else "LF"
    for number, line in enumerate(lines, start=1):
        ends_line = number < len(lines)
        ending = "CRLF" if ends_line and line.endswith("\r") else "LF"
        if "\r" in (line[:-1] if ending == "CRLF" else line):
            raise TableError(
                path,
                number,
                None,
                "found a carriage return (CR) that does not end a CRLF line",
                "LF or CRLF line endings, and no CR inside a caption",
                "remove the stray CR characters, e.g. tr -d '\\r' < FILE > FILE.fixed",
            )
        if ends_line and ending != first_ending:
            raise TableError(
                path,
                number,
                None,
                f"mixed line endings: line 1 ends in {first_ending}, this line in {ending}",
                "one line ending throughout (LF; or CRLF, as in RISCM's raw table)",
                "convert the file, e.g. dos2unix FILE",
            )
    return text.replace("\r\n", "\n"), "CRLF"


def _missing_columns_error(path: Path, header: list[str], missing: list[str], expected: str) -> TableError:
    hints, column = [], None
    for name in missing:
        close = difflib.get_close_matches(name, header, n=1, cutoff=0.5)
        if close:
            label = _column_label(header.index(close[0]), close[0])
            hints.append(f"column {label} looks like {name!r} renamed")
            column = column or label
    return TableError(
        path,
        1,
        column,
        f"the header {header} has no column {', '.join(map(repr, missing))}"
        + (f" ({'; '.join(hints)})" if hints else ""),
        expected,
        "rename the header columns to the expected names",
    )


def _check_header(path: Path, header: list[str]) -> str:
    """Return the layout of a header ("raw" or "long"), or raise a TableError."""
    raw_expected = (
        "the RISCM raw layout 'source,split,image,caption_1,...,caption_5' or the long layout "
        "'image,caption[,split][,source]'"
    )
    if len(header) == 1:
        for delimiter, name in ((";", "semicolon"), ("\t", "tab"), ("|", "pipe")):
            if delimiter in header[0]:
                raise TableError(
                    path,
                    1,
                    "1",
                    f"the header is one column {header[0]!r}, delimited by {name}s",
                    "comma-separated columns",
                    f"save the table with ',' as the delimiter "
                    f"(e.g. pandas.read_csv(FILE, sep={delimiter!r}).to_csv(FILE, index=False))",
                )
    for index, name in enumerate(header):
        if name != name.strip() or not name:
            raise TableError(
                path,
                1,
                _column_label(index, name),
                f"column name {name!r} is empty or has surrounding spaces",
                raw_expected,
                "fix the header",
            )
        if header.index(name) != index:
            raise TableError(
                path,
                1,
                _column_label(index, name),
                f"column {name!r} appears twice",
                raw_expected,
                "remove or rename one of them",
            )
    caption_columns = [name for name in header if name.startswith("caption_")]
    if caption_columns:
        numbers = []
        for name in caption_columns:
            match = _CAPTION_N.fullmatch(name)
            if not match:
                raise TableError(
                    path,
                    1,
                    _column_label(header.index(name), name),
                    f"column {name!r} is not caption_N",
                    "caption_1, caption_2, ...",
                    "rename the column",
                )
            numbers.append(int(match.group(1)))
        if sorted(numbers) != list(range(1, len(numbers) + 1)):
            raise TableError(
                path,
                1,
                None,
                f"caption columns {caption_columns} are not numbered 1..{len(numbers)}",
                "caption_1 .. caption_N, each once",
                "rename or add the missing caption columns",
            )
        missing = [name for name in RAW_COLUMNS if name not in header]
        if missing:
            raise _missing_columns_error(path, header, missing, raw_expected)
        known = set(RAW_COLUMNS) | set(caption_columns)
        layout = "raw"
    else:
        missing = [name for name in LONG_REQUIRED if name not in header]
        if missing:
            raise _missing_columns_error(path, header, missing, raw_expected)
        known = set(LONG_REQUIRED) | set(LONG_OPTIONAL)
        layout = "long"
    for index, name in enumerate(header):
        if name not in known:
            raise TableError(
                path,
                1,
                _column_label(index, name),
                f"unexpected column {name!r}",
                raw_expected,
                "remove the column, or rename it if it is one of the expected ones",
            )
    return layout


def read_caption_table(path: str | Path, split: str | None = None, source: str | None = None) -> CaptionTable:
    """Read a caption table into one `ImageRecord` per image, in order of first appearance.

    `split` is needed for a long-layout table without a split column; `source` fills a missing source column.
    Rows naming the same image are merged (captions appended in table order) when their split and source agree.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: caption table not found. Expected a CSV file; check the --captions path.")
    text, line_ending = _decode(path, path.read_bytes())
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header = next(reader)
    layout = _check_header(path, header)
    columns = {name: index for index, name in enumerate(header)}
    if split is not None:
        if split not in SPLIT_ALIASES:
            raise ValueError(f"--split {split!r} is not a split name. Expected one of {sorted(SPLIT_ALIASES)}.")
        if "split" in columns:
            raise TableError(
                path,
                1,
                _column_label(columns["split"], "split"),
                f"the table has a split column and --split {split} was given too",
                "one of the two",
                "drop --split",
            )
        split = SPLIT_ALIASES[split]
    elif "split" not in columns:
        raise TableError(
            path,
            1,
            None,
            f"the header {header} has no 'split' column",
            "a split column or --split",
            "pass --split train, --split val or --split test",
        )
    if layout == "raw":
        caption_indices = [columns[f"caption_{n}"] for n in range(1, len(header) - len(RAW_COLUMNS) + 1)]
    else:
        caption_indices = [columns["caption"]]

    records: dict[str, ImageRecord] = {}
    line = reader.line_num + 1
    try:
        for row in reader:
            row_line, line = line, reader.line_num + 1
            if len(row) != len(header):
                raise TableError(
                    path,
                    row_line,
                    None,
                    f"the row has {len(row)} fields",
                    f"{len(header)} fields like the header {header}",
                    "quote fields that contain commas, and give every row all the columns",
                )
            image = row[columns["image"]]
            if not image.strip():
                raise TableError(
                    path,
                    row_line,
                    _column_label(columns["image"], "image"),
                    "the image name is empty",
                    "a file name under --images",
                    "fill in the image name or remove the row",
                )
            row_split = split
            if row_split is None:
                value = row[columns["split"]]
                if value not in SPLIT_ALIASES:
                    raise TableError(
                        path,
                        row_line,
                        _column_label(columns["split"], "split"),
                        f"unknown split {value!r}",
                        "one of train, val, test (validation is accepted for val)",
                        "correct the split name",
                    )
                row_split = SPLIT_ALIASES[value]
            row_source = row[columns["source"]] if "source" in columns else (source or DEFAULT_SOURCE)
            captions = [row[index] for index in caption_indices]
            record = records.get(image)
            if record is None:
                records[image] = ImageRecord(image, row_split, row_source, row_line, captions)
                continue
            for column, first, here in (("split", record.split, row_split), ("source", record.source, row_source)):
                if first != here:
                    raise TableError(
                        path,
                        row_line,
                        _column_label(columns.get(column, 0), column),
                        f"image {image!r} has {column} {here!r} here but {first!r} on line {record.line}",
                        f"one {column} per image",
                        f"give image {image!r} a single {column}",
                    )
            record.captions.extend(captions)
    except csv.Error as error:
        raise TableError(
            path,
            line,
            None,
            f"malformed CSV ({error})",
            "RFC 4180 CSV with double-quoted fields",
            "check the quoting near this line",
        ) from None
    if not records:
        raise TableError(
            path,
            2,
            None,
            "the table has a header but no rows",
            "one row per image or caption",
            "check that the right file was exported",
        )
    return CaptionTable(path, layout, line_ending, list(records.values()))
