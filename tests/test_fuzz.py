"""Every data reader, the data stage, the config schema and the recipe loader on arbitrary bytes and
structures: the answer is rows and precise problems, or an error that names the file (and the line
or field) and says how to fix it. Never another exception, never a hang.

The examples are derandomized, so a run is reproducible; each one runs under a time bound. FUZZ_SCALE=N
in the environment runs N times as many (a longer search, still reproducible). Below the properties,
plain tests keep the exact inputs that once broke a reader or the loader.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import signal
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from appliance import config as config_module
from appliance import events as ev
from appliance.config import (
    DataConfig,
    EvalConfig,
    ExportConfig,
    ImportConfig,
    Sampling,
    ServeConfig,
    StageConfig,
    TrainConfig,
    load_settings,
)
from appliance.data import prepare
from appliance.data.clean import clean_messages
from appliance.data.inspect import inspect_file, suggest
from appliance.data.readers import FILE_KINDS, MAX_DEPTH, FileProblem, file_kind, read, record_format
from appliance.data.schema import Problem, Record, RowError
from appliance.data.tasks import TaskSpec, check_messages, load_schema, load_template, to_example
from appliance.errors import ApplianceError, ConfigError
from appliance.fields import option_of, validated
from appliance.pii import Redactor, find_pii
from appliance.run import Run

SECONDS = 10  # the bound on one example: far above what any takes, far below a hang
SCALE = int(os.environ.get("FUZZ_SCALE", "1"))
FUZZ = settings(derandomize=True, deadline=None, max_examples=150 * SCALE, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEW = settings(FUZZ, max_examples=50 * SCALE)
CONFIGS: list[type[StageConfig]] = [ImportConfig, DataConfig, TrainConfig, ExportConfig, EvalConfig, Sampling,
                                    ServeConfig]


class Hang(Exception):
    pass


@contextmanager
def within(seconds: float = SECONDS) -> Iterator[None]:
    """Fail an example that runs longer than `seconds` (an endless loop shows up as Hang)."""
    def on_alarm(signum: int, frame: Any) -> None:
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    started = time.monotonic()
    outer_delay, outer_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_delay:  # an alarm set around this one (a test timeout) still goes off when it was due
            left = outer_delay - (time.monotonic() - started)
            signal.setitimer(signal.ITIMER_REAL, max(left, 0.001), outer_interval)


def outcome(text: str) -> None:
    """Count how examples end (shown by --hypothesis-show-statistics), outside an example too."""
    if currently_in_test_context():
        event(text)


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="fuzz-") as folder:
        yield Path(folder)


# -- strategies ------------------------------------------------------------------------------

# Text of every kind: lone surrogates, NUL and other controls, BOMs, line and paragraph separators.
ANY_TEXT = st.text(st.characters(categories=["L", "M", "N", "P", "S", "Z", "C"]), max_size=40)
ODD_TEXT = st.one_of(ANY_TEXT, st.sampled_from(["", " ", "\ufeff", "\x00", "\r\n", "\u2028", "\ud800", "é",
                                                "\U0001f600", "{{ x }}", "{% for %}", "NaN", "1e999"]))
NUMBERS = st.one_of(st.integers(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True))
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, ODD_TEXT)
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(ODD_TEXT, inner, max_size=4), max_leaves=16)
KEYS = st.sampled_from(["messages", "conversations", "role", "content", "from", "value", "instruction", "input",
                        "output", "prompt", "completion", "system", "text", "label", "type"])
ROWISH = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.one_of(KEYS, ODD_TEXT), inner, max_size=4), max_leaves=12)
ROLES = st.sampled_from(["user", "assistant", "system", "developer", "human", "gpt", "wizard", ""])
TURN = st.fixed_dictionaries({}, optional={"role": st.one_of(ROLES, SCALARS), "content": st.one_of(ODD_TEXT, ROWISH),
                                           "from": st.one_of(ROLES, SCALARS), "value": st.one_of(ODD_TEXT, SCALARS),
                                           "type": st.sampled_from(["text", "image"]), "text": ODD_TEXT})
RECORDS = st.one_of(
    st.dictionaries(st.one_of(KEYS, ODD_TEXT), ROWISH, max_size=5),
    st.fixed_dictionaries({"messages": st.one_of(st.lists(st.one_of(TURN, SCALARS), max_size=4), ROWISH)}),
    st.fixed_dictionaries({"conversations": st.one_of(st.lists(st.one_of(TURN, SCALARS), max_size=4), ROWISH)}),
    st.fixed_dictionaries({"instruction": st.one_of(ODD_TEXT, SCALARS), "output": st.one_of(ODD_TEXT, SCALARS)},
                          optional={"input": st.one_of(ODD_TEXT, SCALARS), "system": SCALARS}),
    st.fixed_dictionaries({"prompt": st.one_of(ODD_TEXT, SCALARS), "completion": st.one_of(ODD_TEXT, SCALARS)}),
    st.fixed_dictionaries({"text": st.one_of(ODD_TEXT, SCALARS), "label": st.one_of(ODD_TEXT, SCALARS),
                           "output": st.one_of(ODD_TEXT, ROWISH)}),
)


# Lines at the limits: deep nesting, a number too long to convert, a long line, escapes of half a character.
EXTREME_LINES = st.sampled_from([b"[" * 5000, b'{"a": ' * 70 + b"1" + b"}" * 70, b'{"n": ' + b"9" * 5000 + b"}",
                                 b'{"prompt": "' + b"x" * 300_000 + b'", "completion": "y"}',
                                 b'{"text": "\\ud800", "\\udfff": 1}', b'{"n": 1e999, "m": NaN, "k": -Infinity}'])


@st.composite
def json_lines(draw: st.DrawFn) -> bytes:
    """A JSON-lines file as people write them, and break them: objects and other values, escaped or
    raw (and then maybe not UTF-8), cut short, blank lines, a BOM, CRLF, a line of garbage."""
    newline = draw(st.sampled_from([b"\n", b"\r\n"]))
    lines = []
    for value in draw(st.lists(st.one_of(RECORDS, JSON_VALUES), max_size=6)):
        text = json.dumps(value, ensure_ascii=draw(st.booleans()))
        raw = text.encode("utf-8", "surrogatepass")
        lines.append(raw[:draw(st.integers(0, len(raw)))] if draw(st.integers(0, 9)) == 0 else raw)
    lines += draw(st.lists(st.one_of(st.binary(max_size=30), st.just(b""), EXTREME_LINES), max_size=2))
    body = newline.join(draw(st.permutations(lines)))
    return (b"\xef\xbb\xbf" if draw(st.booleans()) else b"") + body + draw(st.sampled_from([b"", newline]))


@st.composite
def table_text(draw: st.DrawFn, delimiter: str) -> bytes:
    """A CSV/TSV file: well quoted, or cells joined by hand (stray quotes, ragged rows, NULs, CR)."""
    cells = st.text(st.sampled_from([*'ab ,;\t|"\'\r\n\x00é\ufeff', "\udcff"]), max_size=8)
    rows = draw(st.lists(st.lists(st.one_of(cells, st.just("x" * 200_000)), min_size=1, max_size=4), max_size=6))
    if draw(st.booleans()):
        out = io.StringIO()
        csv.writer(out, delimiter=delimiter).writerows(rows)
        text = out.getvalue()
    else:
        text = draw(st.sampled_from(["\n", "\r\n", "\r"])).join(delimiter.join(row) for row in rows)
    return text.encode("utf-8", "surrogateescape")


# -- the readers ------------------------------------------------------------------------------


def read_checked(path: Path, kind: str, delimiter: str | None = None) -> list[Record | Problem] | Problem:
    """Read a whole file, asserting the readers' promise; returns the items, or the file's Problem."""
    with within():
        try:
            items = list(read(path, kind, delimiter))
        except FileProblem as exc:
            assert exc.problem.file == str(path) and exc.problem.reason
            assert str(path) in str(exc)
            outcome("the file cannot be read")
            return exc.problem
    lines = path.read_bytes().count(b"\n") + 1
    for item in items:
        assert item.file == str(path) and item.line >= 1
        if kind == "jsonl":
            assert item.line <= lines
        if isinstance(item, Problem):
            assert item.reason
            continue
        assert isinstance(item.data, dict) and all(isinstance(k, str) for k in item.data)
        outcome("a record")
        # everything a record holds can be written out as UTF-8 JSON and is nested a bounded depth
        json.dumps(item.data, ensure_ascii=False).encode("utf-8")
        assert _depth(item.data) <= MAX_DEPTH
    return items


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


@FUZZ
@given(content=st.one_of(st.binary(max_size=300), json_lines()))
def test_jsonl_reader(scratch: Path, content: bytes) -> None:
    path = scratch / "rows.jsonl"
    path.write_bytes(content)
    read_checked(path, "jsonl")


@FUZZ
@given(value=st.one_of(st.lists(st.one_of(RECORDS, JSON_VALUES), max_size=5), JSON_VALUES),
       ascii_only=st.booleans(), bom=st.booleans(), cut=st.integers(0, 20), junk=st.binary(max_size=50))
def test_json_array_reader(scratch: Path, value: Any, ascii_only: bool, bom: bool, cut: int, junk: bytes) -> None:
    raw = json.dumps(value, ensure_ascii=ascii_only, indent=cut % 3 or None).encode("utf-8", "surrogatepass")
    raw = raw[:len(raw) - cut] if cut > 15 else raw  # sometimes cut short
    path = scratch / "rows.json"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + (junk if cut == 7 else raw))
    read_checked(path, "json")
    kind = file_kind(path)
    assert kind in ("json", "jsonl")
    read_checked(path, kind)


@FUZZ
@given(kind=st.sampled_from(["csv", "tsv"]), data=st.data(),
       delimiter=st.one_of(st.none(), st.sampled_from([",", ";", "\t", "|", '"', "\n", "\r", "\x00", " ", "ab", ""])))
def test_table_reader(scratch: Path, kind: str, data: st.DataObject, delimiter: str | None) -> None:
    written_with = delimiter if delimiter and len(delimiter) == 1 else ("\t" if kind == "tsv" else ",")
    content = data.draw(st.one_of(table_text(written_with), st.binary(max_size=200)))
    path = scratch / f"rows.{kind}"
    path.write_bytes(data.draw(st.sampled_from([b"", b"\xef\xbb\xbf"])) + content)
    read_checked(path, kind, delimiter)


PARQUET_COLUMNS: dict[str, tuple[Any, st.SearchStrategy[Any]]] = {
    "string": (pa.string(), ANY_TEXT.map(lambda t: t.encode("utf-8", "replace").decode("utf-8"))),
    "binary": (pa.binary(), st.binary(max_size=8)),
    "int64": (pa.int64(), st.integers(-(2**63), 2**63 - 1)),
    "uint64": (pa.uint64(), st.integers(0, 2**64 - 1)),
    "float64": (pa.float64(), st.floats(allow_nan=True, allow_infinity=True)),
    "bool": (pa.bool_(), st.booleans()),
    "timestamp": (pa.timestamp("us"), st.integers(-(2**63) + 1, 2**63 - 1)),
    "timestamp_tz": (pa.timestamp("ns", tz="UTC"), st.integers(-(2**63) + 1, 2**63 - 1)),
    "date32": (pa.date32(), st.integers(-(2**31), 2**31 - 1)),
    "time64": (pa.time64("us"), st.integers(0, 86_399_999_999)),
    "duration": (pa.duration("s"), st.integers(-(2**40), 2**40)),
    "decimal": (pa.decimal128(20, 4), st.decimals(min_value=-(10**15), max_value=10**15, places=4,
                                                  allow_nan=False, allow_infinity=False)),
    "list": (pa.list_(pa.string()), st.lists(st.text(max_size=4), max_size=3)),
    "struct": (pa.struct([("a", pa.int32()), ("b", pa.string())]),
               st.fixed_dictionaries({"a": st.integers(-(2**31), 2**31 - 1), "b": st.text(max_size=4)})),
    "map": (pa.map_(pa.string(), pa.float64()), st.lists(st.tuples(st.text(max_size=3), st.floats()), max_size=2)),
    "null": (pa.null(), st.none()),
}


@st.composite
def parquet_tables(draw: st.DrawFn) -> Any:
    names = draw(st.lists(st.one_of(st.sampled_from(["text", "label", "messages", "a"]), st.text(max_size=6)),
                          min_size=1, max_size=4))
    rows = draw(st.integers(0, 4))
    arrays = []
    for _ in names:
        arrow_type, values = PARQUET_COLUMNS[draw(st.sampled_from(sorted(PARQUET_COLUMNS)))]
        column = draw(st.lists(st.one_of(st.none(), values), min_size=rows, max_size=rows))
        arrays.append(pa.array(column, type=arrow_type))
    return pa.Table.from_arrays(arrays, names=names)


@FUZZ
@given(table=parquet_tables(), damage=st.sampled_from(["none", "truncate", "flip", "dictionary"]),
       where=st.floats(0, 1), byte=st.integers(0, 255))
def test_parquet_reader(scratch: Path, table: Any, damage: str, where: float, byte: int) -> None:
    path = scratch / "rows.parquet"
    pq.write_table(table, path, use_dictionary=damage == "dictionary")
    raw = bytearray(path.read_bytes())
    at = int(where * (len(raw) - 1))
    if damage == "truncate":
        del raw[at:]
    elif damage == "flip":
        raw[at] = byte
    path.write_bytes(bytes(raw))
    read_checked(path, "parquet")


@FUZZ
@given(suffix=st.sampled_from([".jsonl", ".ndjson", ".json", ".JSON", ".csv", ".tsv", ".tab", ".parquet", ".pq",
                               ".txt", "", ".json.gz"]),
       content=st.one_of(st.binary(max_size=200), json_lines()), override=st.sampled_from([None, *FILE_KINDS, "xml"]))
def test_file_kind_and_read_any_file(scratch: Path, suffix: str, content: bytes, override: str | None) -> None:
    path = scratch / f"data{suffix}"
    path.write_bytes(content)
    try:
        kind = file_kind(path, override)
    except FileProblem as exc:
        assert exc.problem.file == str(path) and "unknown file type" in exc.problem.reason
        return
    assert kind in (*FILE_KINDS, "xml")
    read_checked(path, kind)


@FUZZ
@given(suffix=st.sampled_from([".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt"]),
       content=st.one_of(st.binary(max_size=200), json_lines(), table_text(",")), rows=st.integers(1, 5))
def test_inspect_any_file(scratch: Path, suffix: str, content: bytes, rows: int) -> None:
    path = scratch / f"look{suffix}"
    path.write_bytes(content)
    with within():
        info = inspect_file(path, rows=rows)
        suggestion = suggest([info])
    assert info.path == str(path)
    assert info.error is None or info.error.strip()
    assert info.rows_sampled + info.problems <= rows
    json.dumps({"files": [info.as_dict()], "suggestion": suggestion.as_dict()}, ensure_ascii=False).encode("utf-8")


# -- from a record to a conversation, and the data stage -----------------------------------------


@FUZZ
@given(data=RECORDS, fmt=st.sampled_from(["auto", "openai", "sharegpt", "alpaca", "prompt_completion", "table"]),
       task=st.sampled_from(["chat", "classification", "extraction"]),
       labels=st.one_of(st.none(), st.lists(ODD_TEXT, max_size=3)),
       schema=st.sampled_from([None, {"type": "object"}, {"type": "object", "required": ["a"],
                               "properties": {"a": {"type": "string", "pattern": "^x"}}},
                               {"properties": {"a": {"$ref": "#/$defs/missing"}}}]),
       template=st.one_of(st.none(), st.fixed_dictionaries(
           {"user": st.sampled_from(["{{ text }}", "{{ text + 1 }}", "{{ 1 / 0 }}", "{{ missing }}",
                                     "{{ label | upper }}", "{{ text[0] }}"]),
            "assistant": st.sampled_from(["{{ label }}", "{{ output }}", "done"])})))
def test_record_to_conversation(data: dict[str, Any], fmt: str, task: str, labels: list[str] | None,
                                schema: dict[str, Any] | None, template: dict[str, str] | None) -> None:
    """The per-row steps raise RowError (naming the field) for a row they cannot use, nothing else; a row
    they accept is text that PII scanning and the split files can take."""
    assume(_utf8(data))  # as the readers give them: they turn text with half a character into a Problem
    spec = TaskSpec(task=task, labels=labels, schema=schema, template=template)
    record = Record("rows.jsonl", 3, data)
    with within():
        try:
            example = to_example(record, record_format(data) if fmt == "auto" else fmt, spec)
            example.messages = clean_messages(example.messages)
            check_messages(example.messages)
        except RowError as exc:
            assert exc.reason
            return
        findings = [find_pii(m["content"]) for m in example.messages]
        redactor = Redactor()
        for message, found in zip(example.messages, findings, strict=True):
            redactor.redact(message["content"], found)
    json.dumps(example.as_dict(), ensure_ascii=False).encode("utf-8")


def _utf8(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@pytest.fixture(scope="module")
def fuzz_store(scratch: Path) -> Path:
    from appliance.store import Store

    return Store.open(scratch / "store").root


@FEW
@given(suffix=st.sampled_from([".jsonl", ".json", ".csv"]), data=st.data(),
       task=st.sampled_from(["chat", "classification", "extraction"]), on_error=st.sampled_from(["fail", "skip"]),
       pii=st.sampled_from(["report", "redact", "drop"]),
       split=st.sampled_from([(1.0, 0.0, 0.0), (0.5, 0.25, 0.25), (0.34, 0.33, 0.33)]),
       labels=st.one_of(st.none(), st.lists(st.sampled_from(["a", "b", "", "x y"]), min_size=1, max_size=3)))
def test_data_stage_on_any_file(scratch: Path, fuzz_store: Path, suffix: str, data: st.DataObject, task: str,
                                on_error: str, pii: str, split: tuple[float, float, float],
                                labels: list[str] | None) -> None:
    """The whole data stage (without the model's tokenizer and the encoder): a report, or an ApplianceError;
    every problem it lists names the file and a line."""
    content = data.draw(json_lines() if suffix != ".csv" else table_text(","))
    if data.draw(st.booleans()):  # some good rows before the rest, so that the stage also gets to write splits
        good = [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": "Yes."}],
                 "text": f"ticket {i} mentions bob@example.com", "label": "ab"[i % 2], "output": '{"a": "x"}'}
                for i in range(4)]
        head = ("text,label,output\n" + "".join(f"{g['text']},{g['label']},\"{{\"\"a\"\": \"\"x\"\"}}\"\n"
                                                 for g in good)) if suffix == ".csv" \
            else "".join(json.dumps(g if task == "chat" else {k: v for k, v in g.items() if k != "messages"}) + "\n"
                         for g in good)
        content = head.encode("utf-8") + content
    path = scratch / f"stage{suffix}"
    path.write_bytes(content)
    schema = scratch / "schema.json"
    schema.write_text('{"type": "object", "properties": {"a": {"type": "string"}}}', encoding="utf-8")
    run_dir = Path(tempfile.mkdtemp(dir=scratch))
    cfg = DataConfig(inputs=[str(path)], task=task, on_error=on_error, pii=pii, templating=False, near_dup=False,
                     split=split, labels=labels if task == "classification" else None, schema_path=str(schema),
                     store=str(fuzz_store))
    with within():
        try:
            result = prepare.run(cfg, run_dir, ev.Emitter(lambda _event: None))
        except ApplianceError as exc:
            assert exc.message and exc.hint
            outcome(f"stage failed: {exc.title}: {exc.message[:50]}")
            return
    outcome("stage wrote splits")
    report = Run.at(Path(result.run_dir)).require_data_report()
    for problem in report.problems + report.file_problems:
        assert problem.file == str(path) and problem.reason
    for problem in report.problems:
        assert problem.line >= 1


# -- the config schema and the recipe loader ---------------------------------------------------


EDGE_NUMBERS = st.one_of(st.sampled_from([math.nan, math.inf, -math.inf, 0, -0.0, -1, 1, 0.5, 1e-300, 1e300, 2**63,
                                          -(2**63), 10**400]), NUMBERS)


def wrong_values() -> st.SearchStrategy[Any]:
    return st.one_of(JSON_VALUES, EDGE_NUMBERS, ODD_TEXT, st.lists(ODD_TEXT, max_size=3),
                     st.tuples(EDGE_NUMBERS, EDGE_NUMBERS, EDGE_NUMBERS),
                     st.dictionaries(ODD_TEXT, NUMBERS, max_size=2),
                     st.sampled_from(["auto", "lora", "Q4_K_M", "127.0.0.1", "0.0.0.0", "x" * 20, "test", "gguf:Q8_0"]))


def values_of(annotation: Any) -> st.SearchStrategy[Any]:
    """Values near what a field's type allows: its literals, edge numbers, odd text, in the shapes it takes."""
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return st.one_of(st.sampled_from(args), ODD_TEXT)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return st.one_of(*(values_of(a) for a in args))
    if origin is tuple:
        return st.tuples(*(values_of(a) for a in args))
    if origin is list:
        return st.lists(values_of(args[0]), max_size=3)
    if origin is dict:
        return st.dictionaries(ODD_TEXT, values_of(args[1]), max_size=3)
    if annotation in (int, float):
        return EDGE_NUMBERS
    if annotation is bool:
        return st.one_of(st.booleans(), st.sampled_from(["yes", "no", 2, None]))
    if annotation is str:
        return ODD_TEXT
    return wrong_values()


VALID: dict[type[StageConfig], dict[str, Any]] = {
    ImportConfig: {"source": "default"}, DataConfig: {"inputs": ["rows.jsonl"]}, ServeConfig: {"model": "run"},
}  # plus the store, for every stage config that has one


@st.composite
def settings_for(draw: st.DrawFn, cls: type[StageConfig]) -> dict[str, Any]:
    """A valid config's settings with a few changed, added or left out: real field names with
    values of any type, and names that are no field."""
    values: dict[str, Any] = dict(VALID.get(cls, {}))
    if "store" in cls.model_fields:
        values["store"] = "/tmp/store"
    for name in draw(st.sets(st.sampled_from(sorted(values)))) if values else ():
        del values[name]
    for name in draw(st.lists(st.sampled_from(sorted(cls.model_fields)), max_size=3)):
        annotation = cls.model_fields[name].annotation
        values[name] = draw(st.one_of(values_of(annotation), values_of(annotation), wrong_values()))
    values.update(draw(st.dictionaries(ODD_TEXT, wrong_values(), max_size=1)))
    return values


def assert_names_every_field(exc: ConfigError, origins: dict[str, str], cls: type[StageConfig]) -> None:
    from pydantic import ValidationError

    cause = exc.__cause__
    assert isinstance(cause, ValidationError)
    for error in cause.errors():
        if error["loc"]:
            name = str(error["loc"][0])
            assert (f"{origins[name]}: {name}" if name in origins else option_of(cls, name)) in exc.message


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_config_schema_on_any_structure(scratch: Path, cls: type[StageConfig]) -> None:
    """Validation of any dict either builds the config or is one ConfigError naming each field at fault
    (as an option, or at its line of the recipe); a config that builds survives run.yaml and back."""
    from appliance.store import Store

    store = Store(scratch / "store")

    @FUZZ
    @given(values=settings_for(cls), from_file=st.booleans())
    def check(values: dict[str, Any], from_file: bool) -> None:
        origins = {name: f"recipe.yaml:{line}" for line, name in enumerate(values, 1)} if from_file else {}
        with within():
            try:
                cfg = validated(cls, values, origins)
            except ConfigError as exc:
                assert_names_every_field(exc, origins, cls)
                return
        run = Run(store, Path(tempfile.mkdtemp(dir=scratch)))
        run.record("stage", cfg)
        kept = cfg.model_copy(update={name: cls.model_fields[name].default for name in cls.not_recorded})
        assert cls.model_validate(run.settings("stage")) == kept

    check()


NEXT_LINE = "\x85"


def test_run_yaml_keeps_next_line(tmp_path: Path) -> None:
    from appliance.store import Store

    run = Run(Store(tmp_path), tmp_path)
    cfg = TrainConfig(init_from=f"a{NEXT_LINE}b", store="/tmp/store")
    run.record("train", cfg)
    assert TrainConfig.model_validate(run.settings("train")) == cfg


@FUZZ
@given(content=st.one_of(
    st.binary(max_size=200),
    st.text(st.sampled_from([*":-[]{}&*!|>'\"#%@`,? \n\tab01.", "\x07", "\ufeff", "é", "<"]), max_size=60)
    .map(lambda t: t.encode("utf-8")),
    st.one_of(JSON_VALUES, st.dictionaries(st.one_of(NUMBERS, st.booleans(), st.none(), st.sampled_from(
        ["rank", "learning_rate", "method", "cls", "store"])), wrong_values(), max_size=4))
    .map(lambda v: yaml.safe_dump(v, allow_unicode=True).encode("utf-8", "surrogatepass")),
))
def test_recipe_loader_on_any_bytes(scratch: Path, content: bytes) -> None:
    """A recipe file becomes settings and then a TrainConfig, or a ConfigError that names the file (with
    the line of a YAML syntax error, and of a value the schema refuses)."""
    path = scratch / "recipe.yaml"
    path.write_bytes(content)
    with within():
        try:
            recipe = load_settings(path)
        except ConfigError as exc:
            assert exc.message.startswith(str(path)) and exc.hint
            if isinstance(exc.__cause__, yaml.MarkedYAMLError):
                assert re.match(re.escape(str(path)) + r":\d+:\d+: ", exc.message)
            return
        assert all(isinstance(k, str) for k in recipe)
        assert set(recipe.origins) <= set(recipe)
        try:
            validated(TrainConfig, {**recipe, "store": "/tmp/store"}, recipe.origins)
        except ConfigError as exc:
            assert_names_every_field(exc, recipe.origins, TrainConfig)


@FEW
@given(content=st.one_of(
    st.binary(max_size=120),
    st.fixed_dictionaries({}, optional={"system": st.one_of(ODD_TEXT, SCALARS), "user": st.one_of(ODD_TEXT, SCALARS),
                                        "assistant": st.one_of(ODD_TEXT, SCALARS), "extra": ODD_TEXT})
    .map(lambda v: yaml.safe_dump(v, allow_unicode=True).encode("utf-8", "surrogatepass")),
))
def test_template_loader_on_any_bytes(scratch: Path, content: bytes) -> None:
    path = scratch / "template.yaml"
    path.write_bytes(content)
    with within():
        try:
            template = load_template(path)
        except ConfigError as exc:
            assert exc.message.startswith(str(path)) and exc.hint
            return
    assert {"user", "assistant"} <= set(template) and all(isinstance(v, str) for v in template.values())
    TaskSpec(template=template).compiled()


# -- regressions: inputs that once got a traceback -------------------------------------------------


FOUND = Path(__file__).parent / "fuzz_crashes"  # inputs bench/fuzz_readers.py found, each named after its bug


@pytest.mark.parametrize(("name", "expected"), [
    ("csv-header-not-utf8.csv", "1: the header has invalid UTF-8"),  # was: UnicodeEncodeError writing the row
    ("parquet-corrupt-data-page.parquet", "1: damaged Parquet data from row 1 on: Received invalid number of bytes"),
    ("parquet-short-output-buffer.parquet", "1: damaged Parquet data from row 1 on: Output buffer"),  # ArrowInvalid
    ("parquet-string-not-utf8.parquet", "5: text: holds bytes that are not UTF-8 text"),  # was: UnicodeDecodeError
    ("parquet-date-out-of-range.parquet", "1: when: unreadable value: date value out of range"),  # was: OverflowError
    ("parquet-timestamp-column.parquet", "'day': None"),  # was: a datetime in the row, TypeError in json.dumps
])
def test_inputs_the_fuzzing_benchmark_found(name: str, expected: str) -> None:
    path = FOUND / name
    result = read_checked(path, path.suffix.lstrip("."))
    assert expected in (str(result) if isinstance(result, Problem) else " ".join(map(str, result)))
    info = inspect_file(path)
    json.dumps(info.as_dict(), ensure_ascii=False).encode("utf-8")


def _only_item(path: Path, kind: str, delimiter: str | None = None) -> Record | Problem:
    items = read_checked(path, kind, delimiter)
    assert isinstance(items, list) and len(items) == 1
    return items[0]


def test_deeply_nested_json_line_is_a_problem_not_a_recursion_error(tmp_path: Path) -> None:
    path = tmp_path / "deep.jsonl"
    path.write_text("[" * 100_000 + "\n" + '{"a": ' * 70 + "1" + "}" * 70 + "\n")
    items = read_checked(path, "jsonl")
    assert isinstance(items, list)
    assert [i.line for i in items] == [1, 2]
    assert all(isinstance(i, Problem) and f"nested over {MAX_DEPTH} levels" in i.reason for i in items)


def test_deeply_nested_json_array_is_a_file_problem(tmp_path: Path) -> None:
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000)
    problem = read_checked(path, "json")
    assert isinstance(problem, Problem) and "nested over" in problem.reason


def test_deeply_nested_first_line_of_a_json_file(tmp_path: Path) -> None:
    path = tmp_path / "deep.json"
    path.write_text('{"a":' * 100_000 + "\n")
    assert file_kind(path) == "jsonl"


def test_number_with_thousands_of_digits(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    path.write_text('{"prompt": ' + "9" * 5000 + ', "completion": "x"}\n')
    problem = _only_item(path, "jsonl")
    assert isinstance(problem, Problem) and problem.line == 1 and "more than 4300 digits" in problem.reason
    array = tmp_path / "big.json"
    array.write_text("[" + "9" * 5000 + "]")
    assert "digits" in str(read_checked(array, "json"))


def test_lone_surrogate_escape_names_the_field(tmp_path: Path) -> None:
    """json accepts "\\ud800", but no UTF-8 file can hold the string: the data stage crashed writing it."""
    path = tmp_path / "half.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "caf\\ud800"}]}\n'
                    '{"prompt": "smile \\ud83d\\ude00", "completion": "ok"}\n')
    items = read_checked(path, "jsonl")
    assert isinstance(items, list)
    assert isinstance(items[0], Problem) and items[0].field == "messages[0].content"
    assert "half a character" in items[0].reason
    assert isinstance(items[1], Record) and items[1].data["prompt"] == "smile \U0001f600"  # a pair is fine


def test_csv_cell_over_the_csv_module_limit(tmp_path: Path) -> None:
    path = tmp_path / "long.csv"
    path.write_text("text,label\n" + "x" * 200_000 + ",a\nshort,b\n")
    items = read_checked(path, "csv")
    assert isinstance(items, list) and [type(i) for i in items] == [Record, Record]


def test_csv_header_with_invalid_utf8(tmp_path: Path) -> None:
    """The column name reached problems.jsonl as a lone surrogate and the data stage crashed writing it."""
    path = tmp_path / "head.csv"
    path.write_bytes(b"te\xffxt,label\nfine,a\n")
    problem = read_checked(path, "csv")
    assert isinstance(problem, Problem) and problem.line == 1 and "header has invalid UTF-8" in problem.reason


def test_csv_header_names_a_column_twice(tmp_path: Path) -> None:
    path = tmp_path / "twice.csv"
    path.write_text("text,label,text\na,b,c\n")
    problem = read_checked(path, "csv")
    assert isinstance(problem, Problem) and problem.field == "text" and "appears twice" in problem.reason


def test_csv_header_only_and_empty_header(tmp_path: Path) -> None:
    path = tmp_path / "head-only.csv"
    path.write_text("text,label\n\n")
    assert "header but no rows" in str(read_checked(path, "csv"))
    path.write_text("\ntext,label\na,b\n")
    assert "first line is empty" in str(read_checked(path, "csv"))


@pytest.mark.parametrize("delimiter", ['"', "\n", "\r", ";;"])
def test_impossible_delimiter(tmp_path: Path, delimiter: str) -> None:
    path = tmp_path / "rows.csv"
    path.write_text("a,b\nc,d\n")
    problem = read_checked(path, "csv", delimiter)
    assert isinstance(problem, Problem) and "cannot be a column delimiter" in problem.reason


def test_data_file_whose_name_is_not_utf8(tmp_path: Path) -> None:
    """The name reached the report and the splits as a lone surrogate: UnicodeEncodeError writing them."""
    path = tmp_path / "caf\udce9.jsonl"  # the byte 0xE9 in the name, as Python sees it
    path.write_text(json.dumps({"prompt": "q?", "completion": "a."}) + "\n", encoding="utf-8")
    cfg = DataConfig(inputs=[str(path)], templating=False, near_dup=False, split=(1.0, 0.0, 0.0),
                     store=str(tmp_path / "store"))
    with pytest.raises(prepare.DataError, match=r"caf\\udce9.jsonl' is not UTF-8"):
        prepare.run(cfg, tmp_path / "run", ev.Emitter(lambda _event: None))


def test_data_stage_on_a_file_it_cannot_read(tmp_path: Path) -> None:
    """The stage said "0 of 0 rows have problems" before naming the file it could not read."""
    path = tmp_path / "rows.csv"
    path.write_text("text,label\n", encoding="utf-8")
    cfg = DataConfig(inputs=[str(path)], templating=False, near_dup=False, store=str(tmp_path / "store"))
    with pytest.raises(prepare.DataError) as excinfo:
        prepare.run(cfg, tmp_path / "run", ev.Emitter(lambda _event: None))
    expected = f"1 file(s) could not be read:\n  {path}: the file has a header but no rows"
    assert excinfo.value.message.startswith(expected)


def test_file_kind_of_a_missing_json_file(tmp_path: Path) -> None:
    with pytest.raises(FileProblem, match="cannot read the file"):
        file_kind(tmp_path / "missing.json")


def test_parquet_values_that_python_cannot_hold(tmp_path: Path) -> None:
    """A date out of Python's range and a string column that is not UTF-8 raised from to_pylist."""
    path = tmp_path / "odd.parquet"
    not_utf8 = pa.Array.from_buffers(pa.string(), 1, [None, pa.py_buffer(b"\x00\x00\x00\x00\x02\x00\x00\x00"),
                                                      pa.py_buffer(b"\xff\xfe")])
    pq.write_table(pa.table({"when": pa.array([2**62], pa.timestamp("us")), "text": pa.array(["ok"])}), path)
    item = _only_item(path, "parquet")
    assert isinstance(item, Problem) and item.field == "when" and "out of range" in item.reason
    pq.write_table(pa.table({"text": not_utf8}), path)
    item = _only_item(path, "parquet")
    assert isinstance(item, Problem) and item.field == "text" and "not UTF-8" in item.reason


def test_parquet_values_become_json(tmp_path: Path) -> None:
    """Dates, decimals and binary text reached inspect's json.dumps and the extraction output as Python
    objects (a TypeError there)."""
    import datetime

    path = tmp_path / "types.parquet"
    pq.write_table(pa.table({"day": pa.array([datetime.date(2024, 2, 29)]), "amount": pa.array([Decimal("1.50")]),
                             "blob": pa.array([b"text"]), "n": pa.array([Decimal("3")], pa.decimal128(5, 0))}), path)
    item = _only_item(path, "parquet")
    assert isinstance(item, Record)
    assert item.data == {"day": "2024-02-29", "amount": 1.5, "blob": "text", "n": 3}
    assert inspect_file(path).error is None


def test_parquet_with_no_rows_or_a_column_twice(tmp_path: Path) -> None:
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)
    assert "no rows" in str(read_checked(path, "parquet"))
    pq.write_table(pa.Table.from_arrays([pa.array(["a"]), pa.array(["b"])], names=["text", "text"]), path)
    assert "appears twice" in str(read_checked(path, "parquet"))


@pytest.mark.parametrize(("text", "expected"), ids=lambda v: ascii(v)[:24], argvalues=[
    ("- 1\n- 2\n", "recipe.yaml: a recipe is a mapping of setting names to values, not a list"),
    ("rank: 8\nlearning_rate: [1\n", "recipe.yaml:3:1: broken YAML"),
    ("rank: 8\n\tmethod: lora\n", "recipe.yaml:2:1: broken YAML"),
    ("[" * 5000, "recipe.yaml: lists and mappings are nested too deeply"),
    ("rank: 8\nrank: 16\n", "recipe.yaml:2: rank is set twice (also on line 1)"),
    ("1: 8\n", "recipe.yaml:1: the setting name '1' is not text"),
    ("started: 2024-02-30\n", "recipe.yaml:1:10: broken YAML: '2024-02-30' is not a valid timestamp"),
    ("rank: 1" + "0" * 5000 + "\n", "is not a valid int"),
    ("rank: !!timestamp x\n", "recipe.yaml:1:7: broken YAML: 'x' is not a valid timestamp"),
    ("rank: \x07\n", "recipe.yaml:1: the character U+0007 is not allowed"),
    ("hello\n", "not a single text"),
])
def test_broken_recipe_names_file_and_line(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as excinfo:
        load_settings(path)
    assert expected in excinfo.value.message
    assert excinfo.value.message.startswith(str(path))


def test_recipe_that_is_not_utf8_or_not_a_file(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_bytes(b"rank: 8\nmethod: l\xf6ra\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml:2: not UTF-8"):
        load_settings(path)
    with pytest.raises(ConfigError, match="no such recipe"):
        load_settings(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="is not a file"):
        load_settings(tmp_path)


def test_recipe_values_are_named_at_their_line(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text("# a recipe\nrank: 0\nlearnig_rate: 0.001\ncls: 1\n", encoding="utf-8")
    recipe = load_settings(path)
    with pytest.raises(ConfigError) as excinfo:
        validated(TrainConfig, {**recipe, "store": "/tmp/store"}, recipe.origins)
    message = excinfo.value.message
    assert f"{path}:2: rank: Input should be greater than or equal to 1" in message
    assert f"{path}:3: learnig_rate: is not a setting; did you mean learning_rate?" in message
    assert f"{path}:4: cls: is not a setting" in message  # `cls` once collided with validated()'s own argument
    with pytest.raises(ConfigError, match="--cls: is not a setting"):
        validated(TrainConfig, {"cls": 1, "store": "/tmp/store"})


def test_split_of_not_a_number(tmp_path: Path) -> None:
    """(nan, nan, nan) passed the sum check (every comparison with NaN is false) and reached the split."""
    with pytest.raises(ConfigError, match="--split"):
        validated(DataConfig, {"inputs": ["a.jsonl"], "split": (math.nan, math.nan, math.nan), "store": "/tmp/store"})


def test_validator_messages_with_text_that_is_not_utf8() -> None:
    """A command-line argument that is not UTF-8 arrives as lone surrogates; validators that quoted it in their
    message made pydantic raise UnicodeEncodeError instead of a validation error."""
    with pytest.raises(ConfigError, match=r"--targets: unknown targets \\ud800"):
        validated(EvalConfig, {"targets": ["\ud800"], "store": "/tmp/store"})
    with pytest.raises(ConfigError, match=r"--mix: mix weights must be in \(0, 100\]; check \\udcff"):
        validated(TrainConfig, {"mix": {"\udcff": 500.0}, "store": "/tmp/store"})


def test_delimiter_that_cannot_delimit() -> None:
    with pytest.raises(ConfigError, match="--delimiter"):
        validated(DataConfig, {"inputs": ["a.csv"], "delimiter": '"', "store": "/tmp/store"})


def test_template_with_broken_jinja_or_a_failing_expression(tmp_path: Path) -> None:
    path = tmp_path / "template.yaml"
    path.write_text("user: '{{ text '\nassistant: '{{ label }}'\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"template.yaml:1: user: broken Jinja on line 1 of the template"):
        load_template(path)
    path.write_text("- user\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="a template is a mapping"):
        load_template(path)
    path.write_text("system:\nuser: null\nassistant: '{{ label }}'\n", encoding="utf-8")  # once an empty template
    with pytest.raises(ConfigError, match=r"template.yaml:2: user: is empty"):
        load_template(path)
    spec = TaskSpec(task="classification", labels=["a"], template={"user": "{{ text + 1 }}", "assistant": "a"})
    with pytest.raises(RowError, match="user template failed on this row: TypeError"):
        to_example(Record("rows.csv", 2, {"text": "hi", "label": "a"}), "table", spec)


def test_schema_file_that_is_not_a_schema(tmp_path: Path) -> None:
    path = tmp_path / "schema.json"
    for text, expected in (('{"type": ', "schema.json:1:10: broken JSON"), ("[1]", "a JSON schema is an object"),
                           ('{"type": 5}', "not a valid JSON schema at type"), ("[" * 100_000, "not a usable JSON")):
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError, match=re.escape(expected)):
            load_schema(path)
    spec = TaskSpec(task="extraction", schema={"properties": {"a": {"$ref": "#/$defs/missing"}}})
    with pytest.raises(RowError, match=r"a \$ref does not resolve"):
        to_example(Record("rows.jsonl", 1, {"text": "t", "output": {"a": 1}}), "table", spec)


def test_loader_is_used_for_shipped_recipes() -> None:
    recipes = sorted((Path(config_module.__file__).parent / "train" / "recipes").glob("*.yaml"))
    assert recipes
    for recipe in recipes:
        settings = load_settings(recipe)
        validated(TrainConfig, {**settings, "store": "/tmp/store"}, settings.origins)


def test_train_command_names_a_broken_recipe(tmp_path: Path) -> None:
    """`appliance train --recipe` printed a traceback for a YAML list or broken YAML, and `--resume` for a
    run.yaml whose train settings are not a mapping."""
    from conftest import run_cli

    from appliance.store import Store

    store = Store.open(tmp_path / "store")
    run_dir = store.new_run().path
    recipe = tmp_path / "recipe.yaml"
    for text, expected in (("- rank: 8\n", f"{recipe}: a recipe is a mapping of setting names to values, not a list"),
                           ("rank: 8\nmethod: [lora\n", f"{recipe}:3:1: broken YAML")):
        recipe.write_text(text, encoding="utf-8")
        result = run_cli("train", "--run", run_dir.name, "--recipe", str(recipe), store=store.root, timeout=120)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert expected in " ".join(result.stderr.split())
    (run_dir / "run.yaml").write_text("train:\n- rank: 8\n", encoding="utf-8")  # dict() of it raised ValueError
    result = run_cli("train", "--resume", run_dir.name, store=store.root, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "the train settings are damaged" in " ".join(result.stderr.split())
