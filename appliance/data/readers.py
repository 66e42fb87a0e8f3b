"""Streaming readers for JSONL, JSON arrays, CSV/TSV and Parquet, with format detection.

Each reader yields `Record`s and `Problem`s in file order and never holds the whole file in
memory (JSON arrays excepted: they are one document). A bad row becomes a Problem that names the
file, the line and the reason; it never stops the stream.
"""

from __future__ import annotations

import csv
import datetime
import json
import re
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

from appliance.data.schema import Problem, Record

MAX_LINE_BYTES = 4 * 1024 * 1024
MAX_JSON_FILE_BYTES = 512 * 1024 * 1024
MAX_DEPTH = 64  # nesting of objects and lists in one row; deeper is not training data
FILE_KINDS = ("jsonl", "json", "csv", "tsv", "parquet")
RECORD_FORMATS = ("openai", "sharegpt", "alpaca", "prompt_completion", "table")
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
             ".tab": "tsv", ".parquet": "parquet", ".pq": "parquet"}
_BOM = b"\xef\xbb\xbf"
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # a JSON escape that may leave half a character
_PLAIN = (str, int, float, bool, type(None))

# One CSV field may be as long as one JSON line (the csv module's own limit is 128 KiB).
csv.field_size_limit(max(csv.field_size_limit(), MAX_LINE_BYTES))


class FileProblem(Exception):
    """The whole file cannot be read (empty, wrong delimiter, unknown type)."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(str(problem))
        self.problem = problem


def file_kind(path: Path, override: str | None = None) -> str:
    """The file type: the override, else from the suffix (a .json file holding JSON lines is jsonl)."""
    if override:
        return override
    kind = _SUFFIXES.get(path.suffix.lower())
    if kind == "json":  # a .json file may hold JSON lines
        try:
            first_line = _first_line(path)
        except OSError as exc:
            raise FileProblem(Problem(str(path), 0, "", _os_reason(exc))) from exc
        if first_line.startswith(b"{"):
            try:
                json.loads(first_line)
                return "jsonl"
            except RecursionError:
                return "jsonl"  # one line that is one (too deeply nested) object: the reader says so
            except ValueError:
                return "json"
    if kind:
        return kind
    raise FileProblem(Problem(str(path), 0, "", f"unknown file type {path.suffix!r}: use .jsonl, .json, "
                              ".csv, .tsv or .parquet, or pass --file-type"))


def _first_line(path: Path) -> bytes:
    """The first line that is not blank (among the first hundred), without its BOM and spaces."""
    with open(path, "rb") as handle:
        for number in range(100):
            line = handle.readline(MAX_LINE_BYTES)
            stripped = (line.removeprefix(_BOM) if number == 0 else line).strip()
            if stripped or not line:
                return stripped
    return b""


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
    name = str(path)
    if not path.is_file():
        raise FileProblem(Problem(name, 0, "", "no such file"))
    try:
        if path.stat().st_size == 0:
            raise FileProblem(Problem(name, 0, "", "the file is empty"))
        if kind == "jsonl":
            yield from _read_jsonl(path)
        elif kind == "json":
            yield from _read_json_array(path)
        elif kind in ("csv", "tsv"):
            yield from _read_table(path, _checked_delimiter(name, delimiter or ("\t" if kind == "tsv" else ",")))
        elif kind == "parquet":
            yield from _read_parquet(path)
        else:
            raise FileProblem(Problem(name, 0, "", f"unknown file type {kind!r}: use jsonl, json, csv, tsv or "
                                      "parquet"))
    except OSError as exc:  # unreadable (permissions, a disk error): the file as a whole
        raise FileProblem(Problem(name, 0, "", _os_reason(exc))) from exc


def _os_reason(exc: OSError) -> str:
    return f"cannot read the file: {exc.strerror or exc}"


def _checked_delimiter(name: str, delimiter: str) -> str:
    if len(delimiter) != 1 or delimiter in "\"\r\n":
        raise FileProblem(Problem(name, 0, "", f"{delimiter!r} cannot be a column delimiter: give one character "
                                  "other than a quote or a line break, e.g. --delimiter ';'"))
    return delimiter


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
    except RecursionError:
        return Problem(name, line_no, "", f"objects and lists are nested over {MAX_DEPTH} levels deep")
    except ValueError as exc:  # a number too long to convert
        return Problem(name, line_no, "", _number_reason(exc))
    if not isinstance(data, dict):
        return Problem(name, line_no, "", f"expected a JSON object, got {_json_type(data)}")
    if _may_be_odd(text):
        odd = _odd_value(data)
        if odd is not None:
            return Problem(name, line_no, *odd)
    return Record(name, line_no, data)


def _number_reason(exc: ValueError) -> str:
    if "digits" in str(exc):
        return f"a number has more than {sys.get_int_max_str_digits()} digits: write it as a string (in quotes)"
    return f"broken JSON: {exc}"


def _may_be_odd(text: str) -> bool:
    """Cheap test for the rare rows that need `_odd_value`: deep nesting or a surrogate escape."""
    return text.count("[") + text.count("{") > MAX_DEPTH or _SURROGATE_ESCAPE.search(text) is not None


def _odd_value(data: Any) -> tuple[str, str] | None:
    """(field, reason) for a value that no later step could use: nesting deeper than MAX_DEPTH, or
    text holding half a character (a lone UTF-16 surrogate, from an escape such as \\ud800)."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, where, depth = stack.pop()
        if isinstance(value, str):
            if _has_lone_surrogate(value):
                return where, _SURROGATE_REASON
        elif isinstance(value, dict | list):
            if depth >= MAX_DEPTH:
                return where, f"objects and lists are nested over {MAX_DEPTH} levels deep"
            if isinstance(value, list):
                stack.extend((item, f"{where}[{index}]", depth + 1) for index, item in enumerate(value))
                continue
            for key, item in value.items():
                if _has_lone_surrogate(key):
                    return where, f"a key {_SURROGATE_REASON}"
                stack.append((item, f"{where}.{key}" if where else key, depth + 1))
    return None


_SURROGATE_REASON = "holds half a character (a lone \\uD800-\\uDFFF escape): fix the escape, or save the text " \
                    "as UTF-8 without escapes"


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _read_json_array(path: Path) -> Iterator[Record | Problem]:
    name = str(path)
    if path.stat().st_size > MAX_JSON_FILE_BYTES:
        raise FileProblem(Problem(name, 0, "", "JSON array file is over 512 MiB: convert it to JSON "
                                  "lines (one object per line) so it can be streamed"))
    raw = path.read_bytes().removeprefix(_BOM)
    try:
        text = raw.decode("utf-8")
        document = json.loads(text)
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise FileProblem(Problem(name, line, "", f"invalid UTF-8 at byte {exc.start}: save the file as UTF-8")) \
            from exc
    except json.JSONDecodeError as exc:
        raise FileProblem(Problem(name, exc.lineno, "", f"broken JSON: {exc.msg} at column {exc.colno}")) from exc
    except RecursionError as exc:
        raise FileProblem(Problem(name, 0, "", f"objects and lists are nested over {MAX_DEPTH} levels deep")) \
            from exc
    except ValueError as exc:
        raise FileProblem(Problem(name, 0, "", _number_reason(exc))) from exc
    if isinstance(document, dict):
        document = [document]
    if not isinstance(document, list):
        raise FileProblem(Problem(name, 1, "", f"expected a JSON array of objects, got {_json_type(document)}"))
    if not document:
        raise FileProblem(Problem(name, 0, "", "the JSON array is empty"))
    check = _may_be_odd(text)
    for index, item in enumerate(document, 1):
        odd = _odd_value(item) if check and isinstance(item, dict) else None
        if not isinstance(item, dict):
            yield Problem(name, index, f"[{index - 1}]", f"expected a JSON object, got {_json_type(item)}")
        elif odd is not None:
            yield Problem(name, index, f"[{index - 1}]{'.' + odd[0] if odd[0] else ''}", odd[1])
        else:
            yield Record(name, index, item)


def _read_table(path: Path, delimiter: str) -> Iterator[Record | Problem]:
    name = str(path)
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        header = _header(name, reader, delimiter)
        seen_content = False
        while True:
            line_no = reader.line_num + 1  # where this row starts (a quoted cell may span lines)
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:  # a cell over the size limit; the reader goes on at the next line
                yield Problem(name, line_no, "", f"unreadable row: {exc}")
                continue
            if not any(cell.strip() for cell in row):
                continue
            seen_content = True
            if len(row) != len(header):
                yield Problem(name, line_no, "", f"row has {len(row)} columns, the header has {len(header)}")
                continue
            bad = next((h for h, cell in zip(header, row, strict=True) if _has_surrogates(cell)), None)
            if bad is not None:
                yield Problem(name, line_no, bad, "invalid UTF-8: save the file as UTF-8")
                continue
            yield Record(name, line_no, dict(zip(header, row, strict=True)))
    if not seen_content:
        raise FileProblem(Problem(name, 0, "", "the file has a header but no rows"))


def _header(name: str, reader: Any, delimiter: str) -> list[str]:
    """The column names of the first line, or a FileProblem that says what is wrong with them."""
    try:
        header: list[str] = next(reader)
    except StopIteration:
        raise FileProblem(Problem(name, 0, "", "the file is empty")) from None
    except csv.Error as exc:
        raise FileProblem(Problem(name, 1, "", f"unreadable header: {exc}")) from exc
    if len(header) == 1:
        for other, label in (("\t", "tab"), (";", ";"), ("|", "|"), (",", ",")):
            if other != delimiter and other in header[0]:
                raise FileProblem(Problem(
                    name, 1, "", f"the header has one column but contains '{label}': the file looks "
                    f"{label}-delimited; pass --delimiter '{other if other != chr(9) else chr(92) + 't'}'"))
    header = [h.strip() for h in header]
    if not any(header):
        raise FileProblem(Problem(name, 1, "", "the first line is empty: it must name the columns"))
    if any(_has_surrogates(h) for h in header):
        raise FileProblem(Problem(name, 1, "", "the header has invalid UTF-8: save the file as UTF-8"))
    twice = next((h for i, h in enumerate(header) if h in header[:i]), None)
    if twice is not None:
        raise FileProblem(Problem(name, 1, twice, "this column name appears twice: rename one of them"))
    return header


def _read_parquet(path: Path) -> Iterator[Record | Problem]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = str(path)
    try:
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
    except Exception as exc:
        raise FileProblem(Problem(name, 0, "", f"not a readable Parquet file: {exc}")) from exc
    twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if twice is not None:
        raise FileProblem(Problem(name, 0, twice, "this column name appears twice: rename one of them"))
    nested = any(pa.types.is_nested(field.type) for field in parquet.schema_arrow)
    row_no = 0
    batches = parquet.iter_batches(batch_size=2048)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            break
        except (pa.ArrowException, OSError, ValueError, ArithmeticError, MemoryError) as exc:
            raise FileProblem(Problem(name, row_no + 1, "", f"damaged Parquet data from row {row_no + 1} on: "
                                      f"{exc}")) from exc
        try:
            rows = batch.to_pylist()
        except (ValueError, ArithmeticError):  # some value cannot be converted: found row by row below
            rows = None
        for index in range(batch.num_rows):
            row_no += 1
            yield _parquet_row(name, row_no, rows[index] if rows is not None else None, batch, index, nested)
    if row_no == 0:
        raise FileProblem(Problem(name, 0, "", "the file has no rows"))


def _parquet_row(name: str, row_no: int, row: dict[str, Any] | None, batch: Any, index: int,
                 nested: bool) -> Record | Problem:
    """One row as JSON values (dates and times as ISO text, decimals as numbers, binary as text when it
    is UTF-8), or a Problem naming the column whose value cannot be read."""
    data: dict[str, Any] = {}
    for position, column in enumerate(batch.schema.names):
        try:
            value = row[column] if row is not None else batch.column(position)[index].as_py()
            data[column] = _jsonable(value)
        except UnicodeDecodeError:
            return Problem(name, row_no, column, "holds bytes that are not UTF-8 text")
        except (ValueError, ArithmeticError) as exc:  # a date out of range
            return Problem(name, row_no, column, f"unreadable value: {exc}")
        except RecursionError:
            return Problem(name, row_no, column, f"objects and lists are nested over {MAX_DEPTH} levels deep")
    odd = _odd_value(data) if nested else None  # flat columns hold UTF-8 text and scalars only
    return Record(name, row_no, data) if odd is None else Problem(name, row_no, *odd)


def _jsonable(value: Any) -> Any:
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, Decimal):
        return int(value) if value.is_finite() and value == value.to_integral_value() else float(value)
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _json_type(value: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number", bool: "true/false",
            type(None): "null", dict: "an object"}.get(type(value), type(value).__name__)
