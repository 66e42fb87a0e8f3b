"""Streaming readers for JSONL, JSON arrays, CSV/TSV and Parquet, with format detection.

Each reader yields `Record`s and `Problem`s in file order and never holds the whole file in
memory (JSON arrays excepted: they are one document). A bad row becomes a Problem that names the
file, the line and the reason; it never stops the stream.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from appliance.data.schema import Problem, Record

MAX_LINE_BYTES = 4 * 1024 * 1024
MAX_JSON_FILE_BYTES = 512 * 1024 * 1024
FILE_KINDS = ("jsonl", "json", "csv", "tsv", "parquet")
RECORD_FORMATS = ("openai", "sharegpt", "alpaca", "prompt_completion", "table")
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
             ".tab": "tsv", ".parquet": "parquet", ".pq": "parquet"}
_BOM = b"\xef\xbb\xbf"


class FileProblem(Exception):
    """The whole file cannot be read (empty, wrong delimiter, unknown type)."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(str(problem))
        self.problem = problem


def file_kind(path: Path, override: str | None = None) -> str:
    if override:
        return override
    kind = _SUFFIXES.get(path.suffix.lower())
    if kind == "json":  # a .json file may hold JSON lines
        with open(path, "rb") as handle:
            head = handle.read(4096).lstrip(_BOM).lstrip()
        if head.startswith(b"{"):
            first_line = head.split(b"\n", 1)[0]
            try:
                json.loads(first_line)
                return "jsonl"
            except ValueError:
                return "json"
    if kind:
        return kind
    raise FileProblem(Problem(str(path), 0, "", f"unknown file type {path.suffix!r}: use .jsonl, .json, "
                              ".csv, .tsv or .parquet, or pass --file-type"))


def record_format(data: dict[str, Any]) -> str:
    """Which dataset convention a JSON object follows, from its keys."""
    if "messages" in data:
        return "openai"
    if "conversations" in data:
        return "sharegpt"
    if "instruction" in data and "output" in data:
        return "alpaca"
    if "prompt" in data and "completion" in data:
        return "prompt_completion"
    return "table"


def read(path: Path, kind: str, delimiter: str | None = None) -> Iterator[Record | Problem]:
    """Rows of one file, as Records or Problems. Raises FileProblem for an unusable file."""
    if not path.is_file():
        raise FileProblem(Problem(str(path), 0, "", "no such file"))
    if path.stat().st_size == 0:
        raise FileProblem(Problem(str(path), 0, "", "the file is empty"))
    if kind == "jsonl":
        yield from _read_jsonl(path)
    elif kind == "json":
        yield from _read_json_array(path)
    elif kind in ("csv", "tsv"):
        yield from _read_table(path, delimiter or ("\t" if kind == "tsv" else ","))
    elif kind == "parquet":
        yield from _read_parquet(path)
    else:
        raise FileProblem(Problem(str(path), 0, "", f"unknown file type {kind!r}"))


def _read_jsonl(path: Path) -> Iterator[Record | Problem]:
    name = str(path)
    seen_content = False
    with open(path, "rb") as handle:
        line_no = 0
        while True:
            raw = handle.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            line_no += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                size = len(raw)
                while raw and not raw.endswith(b"\n"):  # skip the rest of the giant line
                    raw = handle.readline(MAX_LINE_BYTES)
                    size += len(raw)
                yield Problem(name, line_no, "", f"line is {size / 2**20:.1f} MiB, over the "
                              f"{MAX_LINE_BYTES // 2**20} MiB limit for one row")
                continue
            if line_no == 1:
                raw = raw.removeprefix(_BOM)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield Problem(name, line_no, "", f"invalid UTF-8 at byte {exc.start}: save the file as UTF-8")
                continue
            if not text.strip():
                continue
            seen_content = True
            yield _parse_object(name, line_no, text)
    if not seen_content:
        raise FileProblem(Problem(name, 0, "", "the file has no rows"))


def _parse_object(name: str, line_no: int, text: str) -> Record | Problem:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return Problem(name, line_no, "", f"broken JSON: {exc.msg} at column {exc.colno}")
    if not isinstance(data, dict):
        return Problem(name, line_no, "", f"expected a JSON object, got {_json_type(data)}")
    return Record(name, line_no, data)


def _read_json_array(path: Path) -> Iterator[Record | Problem]:
    name = str(path)
    if path.stat().st_size > MAX_JSON_FILE_BYTES:
        raise FileProblem(Problem(name, 0, "", "JSON array file is over 512 MiB: convert it to JSON "
                                  "lines (one object per line) so it can be streamed"))
    raw = path.read_bytes().removeprefix(_BOM)
    try:
        document = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise FileProblem(Problem(name, 0, "", f"invalid UTF-8 at byte {exc.start}")) from exc
    except json.JSONDecodeError as exc:
        raise FileProblem(Problem(name, exc.lineno, "", f"broken JSON: {exc.msg} at column {exc.colno}")) from exc
    if isinstance(document, dict):
        document = [document]
    if not isinstance(document, list):
        raise FileProblem(Problem(name, 1, "", f"expected a JSON array of objects, got {_json_type(document)}"))
    if not document:
        raise FileProblem(Problem(name, 0, "", "the JSON array is empty"))
    for index, item in enumerate(document, 1):
        if isinstance(item, dict):
            yield Record(name, index, item)
        else:
            yield Problem(name, index, f"[{index - 1}]", f"expected a JSON object, got {_json_type(item)}")


def _read_table(path: Path, delimiter: str) -> Iterator[Record | Problem]:
    name = str(path)
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            raise FileProblem(Problem(name, 0, "", "the file is empty")) from None
        if len(header) == 1:
            for other, label in (("\t", "tab"), (";", ";"), ("|", "|"), (",", ",")):
                if other != delimiter and other in header[0]:
                    raise FileProblem(Problem(
                        name, 1, "", f"the header has one column but contains '{label}': the file looks "
                        f"{label}-delimited; pass --delimiter '{other if other != chr(9) else chr(92) + 't'}'"))
        header = [h.strip() for h in header]
        for row in reader:
            line_no = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                yield Problem(name, line_no, "", f"row has {len(row)} columns, the header has {len(header)}")
                continue
            bad = next((h for h, cell in zip(header, row, strict=True) if _has_surrogates(cell)), None)
            if bad is not None:
                yield Problem(name, line_no, bad, "invalid UTF-8: save the file as UTF-8")
                continue
            yield Record(name, line_no, dict(zip(header, row, strict=True)))


def _read_parquet(path: Path) -> Iterator[Record | Problem]:
    import pyarrow.parquet as pq

    name = str(path)
    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:
        raise FileProblem(Problem(name, 0, "", f"not a readable Parquet file: {exc}")) from exc
    row_no = 0
    for batch in parquet.iter_batches(batch_size=2048):
        for row in batch.to_pylist():
            row_no += 1
            yield Record(name, row_no, row)


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _json_type(value: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number", bool: "true/false",
            type(None): "null", dict: "an object"}.get(type(value), type(value).__name__)
