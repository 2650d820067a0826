"""Reading rows: local files (JSON list, JSON Lines, CSV, Parquet) or a hub dataset → `Record`s.

Each record remembers where it came from ("train.jsonl, line 7"; "data.json, row 3" where rows of a JSON
list, CSV, Parquet file or hub dataset count from 0 and the CSV header is not a row), for every error message.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitune.errors import BituneInputError

FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
# OpenAI roles plus the ShareGPT names for them.


@dataclass(frozen=True)
class Record:
    """One raw row and where it came from (used in every error message about it)."""

    location: str
    fields: dict[str, Any]


def load_records(source: str | Path, split: str = "train") -> list[Record]:
    """Read every row of a local file or, if no such file exists, of a hub dataset's `split`.

    Local files are parsed here rather than by `datasets`, so that errors can name the exact line or row
    (and so that nothing is written to the datasets cache). A `.json` file that does not start with `[`
    is read as JSON Lines, as `datasets` does.

    Example:
        >>> records = load_records("../shared/data/gsm8k/train.jsonl")
        >>> len(records), records[0].location, sorted(records[0].fields)
        (7473, '../shared/data/gsm8k/train.jsonl, line 1', ['answer', 'question'])
    """
    path = Path(source)
    if path.is_file():
        records = _read_file(path)
        if not records:
            raise BituneInputError(f"{path}: the file holds no rows; add some, or point path to another file")
        return records
    if path.exists():
        raise BituneInputError(f"{path} is not a file; point path to a {'/'.join(FILE_SUFFIXES)} file")
    if path.suffix.lower() in FILE_SUFFIXES:
        raise BituneInputError(f"{path}: no such file; check the path (relative paths start at {Path.cwd()})")
    return _read_hub(str(source), split)


def _read_file(path: Path) -> list[Record]:
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise BituneInputError(f"{path}: unsupported file type {suffix!r}; use {', '.join(FILE_SUFFIXES)}")
    raw = path.read_bytes()
    if not raw.strip():
        raise BituneInputError(f"{path}: the file is empty; point path to a file with rows")
    if suffix == ".parquet":
        return _read_parquet(raw, path)
    text = _decode(raw, path)
    if suffix == ".csv":
        return _read_csv(text, path)
    if suffix == ".json" and text.lstrip().startswith("["):
        rows = _parse_json(text, path, first_line=1)
        return [_record(row, f"{path}, row {i}") for i, row in enumerate(rows)]
    return _read_json_lines(text, path)


def _decode(raw: bytes, path: Path) -> str:
    raw = raw.removeprefix(codecs.BOM_UTF8)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise BituneInputError(
            f"{path}, line {line}: byte {raw[error.start]:#04x} is not UTF-8; re-save the file as UTF-8"
        ) from None


def _read_json_lines(text: str, path: Path) -> list[Record]:
    # Split on "\n" only: str.splitlines would also split inside JSON strings at characters such as U+2028.
    return [
        _record(_parse_json(line, path, first_line=number), f"{path}, line {number}")
        for number, line in enumerate(text.split("\n"), start=1)
        if line.strip()
    ]


def _parse_json(text: str, path: Path, first_line: int) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise BituneInputError(
            f"{path}, line {first_line + error.lineno - 1}: invalid JSON ({error.msg}, column {error.colno}); "
            "fix the line (JSON Lines files hold one JSON object per line)"
        ) from None
    except RecursionError:
        raise BituneInputError(f"{path}, line {first_line}: JSON nested too deeply; fix the file") from None


def _read_csv(text: str, path: Path) -> list[Record]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    records = []
    try:
        for index, row in enumerate(reader):
            if None in row:
                raise BituneInputError(
                    f"{path}, row {index}: more values than the header has columns; quote values that "
                    "contain commas"
                )
            records.append(Record(f"{path}, row {index}", row))
    except csv.Error as error:  # raised before the reader counts the failing record's first line
        raise BituneInputError(
            f"{path}, line {reader.line_num + 1}: unreadable CSV ({error}); fix the file"
        ) from None
    return records


def _read_parquet(raw: bytes, path: Path) -> list[Record]:
    import pyarrow as pa  # imported here: only Parquet input needs it
    import pyarrow.parquet as pq

    # A corrupt file raises ArrowException or OSError; a string column that is not UTF-8, UnicodeDecodeError.
    try:
        rows = pq.read_table(io.BytesIO(raw)).to_pylist()
    except (pa.ArrowException, OSError, UnicodeDecodeError) as error:
        raise BituneInputError(f"{path}: unreadable Parquet file ({error}); re-export it") from None
    return [Record(f"{path}, row {index}", row) for index, row in enumerate(rows)]


def _read_hub(name: str, split: str) -> list[Record]:
    import datasets  # imported here: slow to import, and only hub input needs it

    try:
        dataset = datasets.load_dataset(name, split=split)
    except (OSError, ValueError) as error:
        raise BituneInputError(
            f"{name!r} is no local file and could not be loaded from the Hugging Face hub (split {split!r}): "
            f"{error}. Check the path, or the dataset name and split"
        ) from None
    return [_record(row, f"{name} [{split}], row {index}") for index, row in enumerate(dataset)]


def _record(row: Any, location: str) -> Record:
    if not isinstance(row, dict):
        raise BituneInputError(
            f"{location}: expected an object with named fields, got {describe_value(row)}; each row must be a JSON object"
        )
    return Record(location, row)


def describe_value(value: Any) -> str:
    """How a wrongly typed value is described in error messages (no repr of containers: they may be huge)."""
    if isinstance(value, (bool, int, float, str)):
        return f"{type(value).__name__} {value!r:.40}"
    if isinstance(value, dict):
        return "an object" if value else "an empty object"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    return "null" if value is None else type(value).__name__
