"""A first look at data files before preparing them: type, convention, columns, and the task and
column mapping they most likely mean.

It reads the first rows of each file only (fast on any size), imports nothing heavy, shows example
values with PII masked, and never
raises for bad content: what cannot be read is reported per file, so the caller can show it next
to the files that can.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from appliance.data.readers import FileProblem, file_kind, read, record_format
from appliance.data.schema import Problem

SAMPLE_ROWS = 200
TEXT_NAMES = ("text", "input", "message", "body", "question", "description", "content", "ticket", "query")
LABEL_NAMES = ("label", "category", "class", "intent", "topic", "tag", "type", "queue")
OUTPUT_NAMES = ("output", "json", "fields", "answer", "target", "extraction")
MAX_LABELS = 50


@dataclass
class Column:
    name: str
    filled: int = 0  # rows with a non-empty value
    distinct: int = 0
    mean_chars: float = 0.0
    json_objects: int = 0  # values that are (or parse as) JSON objects
    examples: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # of each short value, when there are few


@dataclass
class FileInfo:
    path: str
    kind: str | None = None  # jsonl, json, csv, tsv, parquet
    convention: str | None = None  # openai, sharegpt, alpaca, prompt_completion, table
    rows_sampled: int = 0
    problems: int = 0  # rows among those sampled that could not be read
    columns: list[Column] = field(default_factory=list)
    error: str | None = None  # the file as a whole cannot be read

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Suggestion:
    task: str = "chat"
    text_field: str | None = None
    label_field: str | None = None
    output_field: str | None = None
    labels: list[str] = field(default_factory=list)
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def inspect_file(path: Path, file_type: str | None = None, delimiter: str | None = None,
                 rows: int = SAMPLE_ROWS) -> FileInfo:
    info = FileInfo(str(path))
    if not path.is_file():
        info.error = "no such file" if not path.exists() else "not a file"
        return info
    values: dict[str, list[Any]] = {}
    try:
        info.kind = file_kind(path, file_type)
        for item in read(path, info.kind, delimiter):
            if isinstance(item, Problem):
                info.problems += 1
            else:
                info.rows_sampled += 1
                if info.convention is None:
                    info.convention = record_format(item.data)
                for key, value in item.data.items():
                    values.setdefault(str(key), []).append(value)
            if info.rows_sampled + info.problems >= rows:
                break
    except FileProblem as exc:
        info.error = exc.problem.reason
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        info.error = str(exc)
    info.columns = [_column(name, column) for name, column in values.items()]
    return info


def _column(name: str, values: list[Any]) -> Column:
    texts = [_as_text(v) for v in values]
    filled = [t for t in texts if t.strip()]
    column = Column(name, filled=len(filled), distinct=len(set(filled)),
                    mean_chars=round(sum(len(t) for t in filled) / len(filled), 1) if filled else 0.0,
                    json_objects=sum(_is_json_object(v) for v in values))
    column.examples = [_shown(t) for t in list(dict.fromkeys(filled))[:3]]
    if column.distinct <= MAX_LABELS:
        column.counts = dict(Counter(t.strip() for t in filled).most_common())
    return column


def _shown(text: str) -> str:
    """An example value as shown: PII masked (this is a preview, not the prepared data), cut to 60 characters."""
    from appliance.entities import light_finder
    from appliance.pii import find_pii, mask

    out, last = [], 0
    for finding in find_pii(text, entities=light_finder()):
        out += [text[last:finding.start], mask(finding.value)]
        last = finding.end
    text = "".join(out) + text[last:]
    return text if len(text) <= 60 else text[:59] + "…"


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return json.dumps(value, ensure_ascii=False)


def _is_json_object(value: Any) -> bool:
    if isinstance(value, dict):
        return True
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            return isinstance(json.loads(value), dict)
        except ValueError:
            return False
    return False


def suggest(infos: list[FileInfo]) -> Suggestion:
    """The task and column mapping the files most likely mean (the user can change every part)."""
    readable = [i for i in infos if i.error is None and i.rows_sampled]
    if not readable:
        return Suggestion(reason="no readable rows yet")
    conventions = Counter(i.convention for i in readable)
    if conventions.get("table", 0) < len(readable):
        convention = next(c for c in conventions if c != "table")
        return Suggestion(task="chat", reason=f"{convention} records are conversations")
    columns = _merged_columns(readable)
    rows = sum(i.rows_sampled for i in readable)
    text = _pick(columns, TEXT_NAMES, lambda c: c.mean_chars * (c.filled / rows))
    output = _pick([c for c in columns if c.name != text and c.json_objects >= 0.8 * max(c.filled, 1) > 0],
                   OUTPUT_NAMES, lambda c: c.json_objects)
    if text and output:
        return Suggestion(task="extraction", text_field=text, output_field=output,
                          reason=f"'{output}' holds JSON objects")
    label_like = [c for c in columns if c.name != text and 1 < c.distinct <= MAX_LABELS and c.filled >= 0.9 * rows
                  and c.mean_chars <= 40 and (c.distinct <= rows / 2 or rows < 8)]
    label = _pick(label_like, LABEL_NAMES, lambda c: -c.distinct)
    if text and label:
        labels = sorted(next(c for c in columns if c.name == label).counts)
        return Suggestion(task="classification", text_field=text, label_field=label, labels=labels,
                          reason=f"'{label}' has {len(labels)} distinct short values in the first rows")
    return Suggestion(task="chat", text_field=text,
                      reason="no label or JSON column found: a table needs a template to become a conversation")


def _merged_columns(infos: list[FileInfo]) -> list[Column]:
    merged: dict[str, Column] = {}
    for info in infos:
        for column in info.columns:
            seen = merged.get(column.name)
            if seen is None:
                merged[column.name] = Column(**{**asdict(column), "examples": list(column.examples),
                                                "counts": dict(column.counts)})
            else:
                total = seen.filled + column.filled
                seen.mean_chars = round((seen.mean_chars * seen.filled + column.mean_chars * column.filled)
                                        / max(total, 1), 1)
                seen.filled, seen.json_objects = total, seen.json_objects + column.json_objects
                for value, count in column.counts.items():
                    seen.counts[value] = seen.counts.get(value, 0) + count
                seen.distinct = max(seen.distinct, len(seen.counts) if seen.counts else column.distinct)
    return list(merged.values())


def _pick(columns: list[Column], names: tuple[str, ...], score: Any) -> str | None:
    """A column with a conventional name wins; otherwise the best-scoring one."""
    if not columns:
        return None
    by_name = {c.name.lower(): c for c in columns}
    for name in names:
        if name in by_name:
            return by_name[name].name
    return max(columns, key=score).name

