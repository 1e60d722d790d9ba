"""Reading and validating caption tables (RISCM's raw layout or the long layout), and writing the builder's CSV files.

Every problem with a table is a `TableError` naming the file, the line and the column, what was found, what was
expected and how to fix it. Nothing is guessed or silently repaired; a byte-order mark names the encoding.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import hashlib
import io
import os
import re
import stat
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
FIELD_LIMIT = 131_072  # characters in one field: Python's csv default; a longer one is no caption
# A spreadsheet runs a cell that starts with one of these as a formula (=HYPERLINK(...), +cmd|...): OWASP's list
# https://owasp.org/www-community/attacks/CSV_Injection
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


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
    caption_lines: list[int] = field(default_factory=list)  # the table line of each caption


@dataclass
class CaptionTable:
    path: Path
    layout: str  # "raw" or "long"
    line_ending: str  # "LF" or "CRLF"
    records: list[ImageRecord]
    encoding: str = "UTF-8"  # or "UTF-8 with BOM", "UTF-16 LE with BOM", ...
    sha256: str = ""  # of the bytes read: a pipe can be read only once


def spreadsheet_safe(cell):
    """A text cell that a spreadsheet would run as a formula, with a leading apostrophe (shown, never run); numbers
    and other text as they are. Only the CSV files change: the dataset keeps the text as it is."""
    return "'" + cell if isinstance(cell, str) and cell.startswith(FORMULA_STARTS) else cell


def write_csv(path: Path, rows) -> None:
    """Every CSV file the builder writes goes through here, so that no cell runs as a spreadsheet formula."""
    with open(path, "w", encoding="utf-8", newline="") as file:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerows([spreadsheet_safe(cell) for cell in row] for row in rows)


def read_table_bytes(path: Path) -> bytes:
    """The table file's bytes. A pipe (`--captions <(zcat t.csv.gz)`) is read like a file; a folder, a device or a
    missing path is a one-line error."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: caption table not found. Expected a CSV file; check the --captions path."
        ) from None
    except OSError as error:
        raise OSError(f"{path}: cannot be read ({error.strerror}). Expected a readable CSV file.") from None
    if stat.S_ISDIR(mode):
        tables = sorted(entry.name for entry in path.glob("*.csv"))[:3]
        hint = f" such as {', '.join(tables)}" if tables else ""
        raise IsADirectoryError(
            f"{path}: a folder, not a caption table. Expected a CSV file. Fix: pass the table file inside it{hint}."
        )
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
        raise OSError(
            f"{path}: a {'socket' if stat.S_ISSOCK(mode) else 'device file'}, not a regular file. Expected a CSV "
            "file (or a pipe). Fix: pass the table file."
        )
    try:
        return path.read_bytes()
    except OSError as error:
        raise OSError(
            f"{path}: cannot be read ({error.strerror}). Expected a readable CSV file. Fix: check its permissions."
        ) from None


def _column_label(index: int, name: str) -> str:
    return f"{index + 1} ({name!r})"


# Byte-order marks, longest first: a UTF-32 LE mark starts with the UTF-16 LE one.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le", "UTF-32 LE with BOM"),
    (codecs.BOM_UTF32_BE, "utf-32-be", "UTF-32 BE with BOM"),
    (codecs.BOM_UTF8, "utf-8", "UTF-8 with BOM"),
    (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16 LE with BOM"),
    (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16 BE with BOM"),
)


def _check_nul_bytes(path: Path, raw: bytes) -> None:
    """Name what a file with NUL bytes most likely is: UTF-16 without a BOM, a workbook, or not text at all."""
    first = raw.find(b"\x00")
    if first < 0:
        return
    line = raw.count(b"\n", 0, first) + 1
    expected = "a text CSV in UTF-8 (with or without a byte-order mark), or UTF-16 with a byte-order mark"
    if raw.startswith(b"PK\x03\x04"):
        raise TableError(
            path,
            1,
            None,
            "the file is a ZIP archive (an Excel .xlsx workbook?), not a CSV text file",
            expected,
            "export the sheet as 'CSV UTF-8 (Comma delimited)' and pass that file",
        )
    sample = raw[:4096]
    odd, even = sample[1::2].count(0), sample[0::2].count(0)
    if len(sample) >= 4 and max(odd, even) >= 0.4 * len(sample) / 2 and min(odd, even) == 0:
        codec = "UTF-16LE" if odd else "UTF-16BE"
        raise TableError(
            path,
            line,
            None,
            f"every other byte is NUL: this looks like {codec[:6]} {codec[6:]} text without a byte-order mark",
            expected,
            f"convert it into a new file and pass that one, e.g. iconv -f {codec} -t UTF-8 FILE > FILE.utf8.csv",
        )
    raise TableError(
        path,
        line,
        None,
        f"byte b'\\x00' (NUL) at byte offset {first}: the file is not text",
        expected,
        "check that --captions names the caption table, and export it again as CSV UTF-8",
    )


def _decode(path: Path, raw: bytes) -> tuple[str, str, str]:
    """Return the table text with LF line endings, the line ending found ("LF" or "CRLF") and the encoding.

    UTF-8 is read as it is; a byte-order mark selects UTF-8, UTF-16 or UTF-32 and is removed (spreadsheets write one).
    """
    codec, encoding, offset = "utf-8", "UTF-8", 0
    for bom, bom_codec, name in _BOMS:
        if raw.startswith(bom):
            codec, encoding, offset = bom_codec, name, len(bom)
            break
    else:
        _check_nul_bytes(path, raw)
    body = raw[offset:]
    try:
        text = body.decode(codec)
    except UnicodeDecodeError as error:
        prefix = body[: error.start].decode(codec, errors="replace")
        line = prefix.count("\n") + 1
        column = max(1, len(next(csv.reader([prefix.rpartition("\n")[2]]), [])))
        if codec == "utf-8":
            fix = "convert the file, e.g. iconv -f latin1 -t utf-8 FILE > FILE.utf8"
        else:
            fix = "the file is damaged or not in the encoding its byte-order mark names: export the table again"
        raise TableError(
            path,
            line,
            str(column),
            f"byte {body[error.start : error.start + 1]!r} is not valid {encoding.removesuffix(' with BOM')} "
            f"(byte offset {offset + error.start})",
            f"{encoding.removesuffix(' with BOM')} text",
            fix,
        ) from None
    if not text.strip():
        raise TableError(
            path,
            1,
            None,
            "the file is empty",
            "a header line such as 'source,split,image,caption_1,...,caption_5' or 'image,caption'",
            "export the table again",
        )
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise TableError(
            path,
            line,
            None,
            "the text holds a NUL character",
            "captions and image names without NUL characters",
            "export the table again; if it came from a script, check what it writes",
        )
    # RISCM's own raw table uses CRLF line endings throughout: that is accepted, normalised and reported.
    # Mixed endings or a bare CR mean an edited or corrupted file and are an error.
    if "\r" not in text:
        return text, "LF", encoding
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
    return text.replace("\r\n", "\n"), "CRLF", encoding


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
    raw = read_table_bytes(path)
    text, line_ending, encoding = _decode(path, raw)
    limit = csv.field_size_limit()
    try:
        # Read with no field limit, so that a field over FIELD_LIMIT is reported with its real cause (below)
        csv.field_size_limit(max(limit, len(text) + 1))
        table = _read_rows(path, text, split, source)
    finally:
        csv.field_size_limit(limit)
    return CaptionTable(path, table[0], line_ending, table[1], encoding, hashlib.sha256(raw).hexdigest())


def _long_field(path: Path, line: int, header: list[str], row: list[str]) -> TableError | None:
    """The error for a row with a field longer than FIELD_LIMIT characters: a real caption that long, or (when the
    field holds many lines) a quote that opened a field and never closed."""
    for index, value in enumerate(row):
        if len(value) <= FIELD_LIMIT:
            continue
        column = _column_label(index, header[index]) if index < len(header) else str(index + 1)
        lines = value.count("\n")
        if lines > 2:
            return TableError(
                path,
                line,
                column,
                f"a field of {len(value):,} characters spanning {lines + 1:,} lines: a double quote opens it and "
                "none closes it where the caption ends",
                "RFC 4180 CSV with double-quoted fields",
                f'check the quoting on line {line} (a quote inside a caption is written as two: "")',
            )
        return TableError(
            path,
            line,
            column,
            f"a field of {len(value):,} characters, over the limit of {FIELD_LIMIT:,} for one caption",
            "captions of ordinary length",
            "shorten or remove that caption (or check that the column holds captions, not pasted text)",
        )
    return None


def _read_rows(path: Path, text: str, split: str | None, source: str | None) -> tuple[str, list[ImageRecord]]:
    """The table's layout and its records (see `read_caption_table`)."""
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
            if (error := _long_field(path, row_line, header, row)) is not None:
                raise error
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
                records[image] = ImageRecord(
                    image, row_split, row_source, row_line, captions, [row_line] * len(captions)
                )
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
            record.caption_lines.extend([row_line] * len(captions))
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
    return layout, list(records.values())
