"""The data stage: `appliance data prepare` as a job.

One streaming pass reads every file, converts rows to conversations, cleans them, checks them,
scrubs PII, drops exact duplicates and measures templated lengths, writing survivors to a pool
file. Then near-duplicates are removed, the split is drawn (stratified for classification),
evaluation rows that nearly repeat training rows move to training (so the evaluation measures
generalisation, and no row is lost), and a second pass writes the splits. The
output folder appears complete or not at all; every row read is accounted for in the report.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from appliance import faults, pii_eval, records
from appliance.config import DataConfig, shown
from appliance.data import dedup, split
from appliance.data.clean import clean_messages
from appliance.data.readers import FileProblem, file_kind, read, record_format
from appliance.data.schema import Example, Problem, Record, RowError
from appliance.data.tasks import TaskSpec, check_messages, load_schema, load_template, to_example
from appliance.entities import Entity, EntityFinder
from appliance.errors import ApplianceError, ConfigError, StoreError
from appliance.events import Emitter
from appliance.fsutil import replace_dir, sha256_file
from appliance.pii import PII_TYPES, Finding, PiiSummary, Redactor, find_pii, mask
from appliance.recognizers import RECOGNIZERS, Recognizer
from appliance.recognizers import load as load_recognizers
from appliance.records import (
    Contaminated,
    Contamination,
    Counts,
    DataReport,
    DataResult,
    Duplicate,
    Duplicates,
    InputFile,
    Labels,
    Lengths,
    NearDuplicate,
    Output,
    PiiDropped,
    PiiPreview,
    PiiReport,
)
from appliance.run import PROBLEMS, SPLITS, Run
from appliance.store import Store

ENTITY_BATCH = 64  # rows whose messages entity recognition reads at once (spaCy's pipe: about 1.8x one by one)
PII_PREVIEWS = 8  # rows shown before and after PII handling in the report
MAX_LISTED = 10_000  # rows listed inline in the report; every problem is in problems.jsonl too


class DataError(ApplianceError):
    title = "Data problems"


def run(cfg: DataConfig, run_dir: Path, emit: Emitter) -> DataResult:
    started = time.monotonic()
    store = Store.open(cfg.store)
    target = Run(store, run_dir)
    inputs = _inputs(cfg)
    spec = _task_spec(cfg, inputs)
    own = load_recognizers(Path(cfg.pii_recognizers), PII_TYPES) if cfg.pii_recognizers else []
    entities = None
    if cfg.pii_entities:
        emit.progress("loading the entity recognizers", 0)
        entities = EntityFinder(cfg.pii_entities, languages=cfg.pii_languages)
    tokenizer, model_name = _tokenizer(cfg, store)
    embedder = None
    if cfg.near_dup:
        emit.progress("loading the sentence encoder", 0)
        from appliance.embedder import Embedder, ensure_onnx

        embedder = Embedder(ensure_onnx(store.root))
    staging = run_dir / f".data-staging-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    staging.mkdir(parents=True)
    try:
        scan = _Scan(cfg, spec, tokenizer, embedder, emit, own, entities)
        with (open(staging / "pool.jsonl", "w", encoding="utf-8") as pool,
              open(staging / PROBLEMS, "w", encoding="utf-8") as problems):
            scan.problem_spool = problems
            for path in inputs:
                scan.file(path, pool)
        if scan.problems and cfg.on_error == "fail":
            _fail(target, staging, scan)
        emit.check_cancelled()
        report = _finish(cfg, scan, staging, emit, store.cache_dir)
        report.inputs = [InputFile(path=str(p), sha256=sha256_file(p), bytes=p.stat().st_size) for p in inputs]
        report.config, report.model = cfg, model_name
        report.seconds = round(time.monotonic() - started, 2)
        (staging / "pool.jsonl").unlink()
        for name in SPLITS:
            report.outputs[name].sha256 = sha256_file(staging / f"{name}.jsonl")
        report.outputs["problems"] = Output(rows=scan.problem_count + len(scan.file_problems), path=PROBLEMS,
                                            sha256=sha256_file(staging / PROBLEMS))
        target.write_data_report(report, staging)
        if spec.schema is not None:  # the run keeps the schema its answers were checked against (evaluation uses it)
            target.write_schema(spec.schema, staging)
        if cfg.pii_recognizers:  # and the rules its PII was found with (the signed manifest covers them)
            shutil.copyfile(cfg.pii_recognizers, staging / RECOGNIZERS)
        faults.point("data.register")
        replace_dir(staging, target.data_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for path in (*[target.split_path(s) for s in SPLITS], target.data_dir / PROBLEMS, target.data_report_path):
        emit.artifact(path, kind="data")
    counts = report.counts
    emit.log(f"kept {counts.train} train, {counts.val} val, {counts.test} test rows of {counts.rows_read} read")
    return DataResult(run_dir=str(run_dir), data_dir=str(target.data_dir), counts=counts, pii=report.pii.counts,
                      seconds=report.seconds)


def _inputs(cfg: DataConfig) -> list[Path]:
    odd = next((p for p in cfg.inputs if "\x00" in p or shown(p) != p), None)
    if odd is not None:  # a name that is not UTF-8 could not be written into the report and the splits
        raise DataError(f"the file name '{shown(odd)}' is not UTF-8 text", "Rename the file (UTF-8, no NUL).")
    paths = [Path(p).expanduser().resolve() for p in cfg.inputs]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"no such file: {', '.join(missing)}", "Check the paths of the data files.")
    return paths


def _task_spec(cfg: DataConfig, inputs: list[Path]) -> TaskSpec:
    spec = TaskSpec(task=cfg.task, text_field=cfg.text_field, label_field=cfg.label_field,
                    output_field=cfg.output_field, labels=cfg.labels)
    if cfg.template_path:
        spec.template = load_template(Path(cfg.template_path))
    if cfg.task == "extraction":
        if not cfg.schema_path:
            raise ConfigError("extraction needs a JSON schema of the output", "Pass --schema FILE.json.")
        spec.schema = load_schema(Path(cfg.schema_path))
    if cfg.task == "classification" and spec.labels is None:
        spec.labels = _collect_labels(cfg, inputs)
    return spec


def _collect_labels(cfg: DataConfig, inputs: list[Path]) -> list[str]:
    labels: set[str] = set()
    for path in inputs:
        try:
            for item in read(path, file_kind(path, cfg.file_type), cfg.delimiter):
                if isinstance(item, Record):
                    value = item.data.get(cfg.label_field)
                    if value is not None and str(value).strip():
                        labels.add(str(value).strip())
        except FileProblem:
            continue  # reported by the main pass
        if len(labels) > 1000:
            raise DataError(f"more than 1000 distinct values in the label column {cfg.label_field!r}",
                            "Check --label-field, or pass the label set with --labels.")
    if not labels:
        raise DataError(f"no labels found in the column {cfg.label_field!r}", "Set --label-field.")
    return sorted(labels)


def _tokenizer(cfg: DataConfig, store: Store) -> tuple[Any, str | None]:
    if not cfg.templating:
        return None, None
    name = store.resolve_model(cfg.model, "model whose chat template the data uses",
                               "Import it (appliance models import default), name another with --model, "
                               "or pass --no-templating.")
    from appliance.templating import load_tokenizer

    tokenizer = load_tokenizer(store.model_dir(name))
    if not tokenizer.chat_template:
        raise StoreError(f"the model {name!r} has no chat template", "Choose a chat model with --model.")
    return tokenizer, name


class _Rows:
    """Per-row facts of the kept rows, in compact arrays (a few bytes a row, so memory stays flat
    while the rows themselves stream to disk)."""

    def __init__(self) -> None:
        self.files: list[str] = []
        self._file_index: dict[str, int] = {}
        self.label_names: list[str] = []
        self._label_index: dict[str, int] = {}
        self.file_of, self.line_of = array("I"), array("I")
        self.label_of = array("i")
        self.length, self.trained = array("I"), array("I")

    def __len__(self) -> int:
        return len(self.line_of)

    def packed_source(self, file: str, line: int) -> int:
        index = self._file_index.setdefault(file, len(self.files))
        if index == len(self.files):
            self.files.append(file)
        return index << 32 | line

    def unpack(self, packed: int) -> str:
        return f"{self.files[packed >> 32]}:{packed & 0xFFFFFFFF}"

    def add(self, example: Example, length: int, trained: int) -> None:
        packed = self.packed_source(example.file, example.line)
        self.file_of.append(packed >> 32)
        self.line_of.append(example.line)
        if example.label is None:
            self.label_of.append(-1)
        else:
            index = self._label_index.setdefault(example.label, len(self.label_names))
            if index == len(self.label_names):
                self.label_names.append(example.label)
            self.label_of.append(index)
        self.length.append(length)
        self.trained.append(trained)

    def source(self, row: int) -> str:
        return f"{self.files[self.file_of[row]]}:{self.line_of[row]}"

    def label(self, row: int) -> str | None:
        index = self.label_of[row]
        return None if index < 0 else self.label_names[index]


class _Scan:
    """The streaming first pass and everything it learns."""

    def __init__(self, cfg: DataConfig, spec: TaskSpec, tokenizer: Any, embedder: Any, emit: Emitter,
                 own: list[Recognizer], entities: EntityFinder | None = None) -> None:
        self.cfg, self.spec, self.tokenizer, self.embedder, self.emit = cfg, spec, tokenizer, embedder, emit
        self.own = own  # the organisation's recognizers
        self.entities = entities  # names, addresses, places, organisations (--pii-entities)
        self._pending: list[tuple[Example, int, int]] = []  # valid rows waiting for entity recognition
        self.redactor = Redactor() if cfg.pii_scope == "dataset" else None  # one numbering for every row
        self.rows_read = 0
        self.problems: list[Problem] = []
        self.problem_count = 0
        self.file_problems: list[Problem] = []
        self.pii = PiiSummary()
        self.pii_dropped: list[PiiDropped] = []
        self.pii_dropped_count = 0
        self.pii_previews: list[PiiPreview] = []
        self.seen: dict[int, int] = {}  # exact key -> packed source of the first row with it
        self.exact_dups: list[Duplicate] = []
        self.exact_dup_count = 0
        self.rows = _Rows()
        self.problem_spool: Any = None
        self.embeddings: list[np.ndarray] = []
        self._texts: list[str] = []
        self.formats: dict[str, str] = {}

    def file(self, path: Path, pool: Any) -> None:
        file_format: str | None = None if self.cfg.format == "auto" else self.cfg.format
        first_line = 0
        try:
            for item in read(path, file_kind(path, self.cfg.file_type), self.cfg.delimiter):
                self.rows_read += 1
                if self.rows_read % 100 == 0:
                    faults.point("data.rows")
                if self.rows_read % 500 == 0:
                    self.emit.progress(f"checking {path.name}", self.rows_read)
                    self.emit.check_cancelled()
                if isinstance(item, Problem):
                    self._problem(item)
                    continue
                detected = record_format(item.data)
                if file_format is None:
                    file_format, first_line = detected, item.line
                    self.formats[str(path)] = detected
                elif (self.cfg.format == "auto" and detected != file_format and self.spec.task == "chat"
                      and self.spec.template is None):
                    self._problem(Problem(item.file, item.line, "", f"this row is {detected} but the file is "
                                          f"{file_format} (from line {first_line}): one format per file"))
                    continue
                self._row(item, file_format, pool)
        except FileProblem as exc:
            self.file_problems.append(exc.problem)
            self._problem(exc.problem, count_row=False)
        self._drain(pool)
        self._flush_embeddings()

    def _problem(self, problem: Problem, count_row: bool = True) -> None:
        self.problem_count += 1 if count_row else 0
        if self.problem_spool is not None:
            self.problem_spool.write(json.dumps(problem.as_dict(), ensure_ascii=False) + "\n")
        if len(self.problems) < MAX_LISTED:
            self.problems.append(problem)

    def _row(self, record: Record, fmt: str, pool: Any) -> None:
        try:
            example = to_example(record, fmt, self.spec)
            example.messages = clean_messages(example.messages)
            check_messages(example.messages)
            ids_len, trained = self._measure(example)
        except RowError as exc:
            self._problem(Problem(record.file, record.line, exc.field, exc.reason))
            return
        self._pending.append((example, ids_len, trained))
        if len(self._pending) >= ENTITY_BATCH:
            self._drain(pool)

    def _drain(self, pool: Any) -> None:
        """The valid rows waiting for entity recognition, which reads them as one batch, then the rest of their
        checks in the order they were read."""
        pending, self._pending = self._pending, []
        named: list[Any]
        if self.entities:
            named = self.entities.find_conversations([[m["content"] for m in e.messages] for e, _, _ in pending])
        else:
            named = [[None] * len(e.messages) for e, _, _ in pending]
        for (example, ids_len, trained), found in zip(pending, named, strict=True):
            self._pii_and_keep(example, ids_len, trained, found, pool)

    def _pii_and_keep(self, example: Example, ids_len: int, trained: int, named: Sequence[Sequence[Entity] | None],
                      pool: Any) -> None:
        findings = [find_pii(m["content"], self.cfg.pii_region, self.own, found)
                    for m, found in zip(example.messages, named, strict=True)]
        flat = [f for per_message in findings for f in per_message]
        self.pii.add(flat)
        if flat and len(self.pii_previews) < PII_PREVIEWS:
            self._preview(example, findings)
        if flat and self.cfg.pii == "drop":
            types = sorted({f.type for f in flat})
            self.pii_dropped_count += 1
            if len(self.pii_dropped) < MAX_LISTED:
                self.pii_dropped.append(PiiDropped(source=example.source, types=types))
            return
        key = dedup.exact_key(example.messages)
        if self.cfg.dedup and key in self.seen:
            self.exact_dup_count += 1
            if len(self.exact_dups) < MAX_LISTED:
                self.exact_dups.append(Duplicate(source=example.source, duplicate_of=self.rows.unpack(self.seen[key])))
            return
        if flat and self.cfg.pii == "redact":
            redactor = self.redactor or Redactor()
            example.messages = [{"role": m["role"], "content": redactor.redact(m["content"], f)}
                                for m, f in zip(example.messages, findings, strict=True)]
            try:
                ids_len, trained = self._measure(example)  # placeholders change the length
            except RowError as exc:  # <PERSON_1> can take more tokens than the name it stands for
                self._problem(Problem(example.file, example.line, exc.field, f"{exc.reason} (after PII redaction)"))
                return
        self.seen[key] = self.rows.packed_source(example.file, example.line)
        self._keep(example, ids_len, trained, pool)

    def _preview(self, example: Example, findings: list[list[Finding]]) -> None:
        """One message before (its PII masked, so the report itself holds none) and after this stage."""
        message, found = next((m, f) for m, f in zip(example.messages, findings, strict=True) if f)
        text, before, last = message["content"], [], 0
        for finding in found:
            before += [text[last:finding.start], mask(finding.value)]
            last = finding.end
        after = {"redact": (self.redactor or Redactor()).redact(text, found), "report": "".join(before) + text[last:],
                 "drop": "(the row is dropped)"}[self.cfg.pii]
        self.pii_previews.append(PiiPreview(source=example.source, role=message["role"],
                                            types=sorted({f.type for f in found}),
                                            before=_cut("".join(before) + text[last:]), after=_cut(after)))

    def _measure(self, example: Example) -> tuple[int, int]:
        if self.tokenizer is None:
            return 0, 0
        from appliance.templating import encode

        ids, trained = encode(self.tokenizer, example.messages)
        if len(ids) > self.cfg.max_seq_len and not self.cfg.truncate:
            raise RowError("messages", f"{len(ids)} tokens after templating, over --max-seq-len "
                           f"{self.cfg.max_seq_len}: raise it, shorten the row, or pass --truncate")
        return len(ids), sum(trained)

    def _keep(self, example: Example, length: int, trained: int, pool: Any) -> None:
        pool.write(json.dumps(example.as_dict(), ensure_ascii=False) + "\n")
        self.rows.add(example, length, trained)
        if self.embedder is not None:
            self._texts.append(example.text())
            if len(self._texts) >= 512:
                self._flush_embeddings()

    def _flush_embeddings(self) -> None:
        if self.embedder is not None and self._texts:
            self.embeddings.append(self.embedder.embed(self._texts))
            self._texts = []


def _fail(run: Run, staging: Path, scan: _Scan) -> None:
    listing = run.failed_problems_path
    os.replace(staging / PROBLEMS, listing)
    listed = "\n".join(f"  {p}" for p in scan.problems[:20])
    more = len(scan.problems) - 20
    counts = [f"{scan.problem_count} of {scan.rows_read} rows have problems"] if scan.problem_count else []
    counts += [f"{len(scan.file_problems)} file(s) could not be read"] if scan.file_problems else []
    raise DataError(
        ", and ".join(counts) + f":\n{listed}" + (f"\n  ... and {more} more" if more > 0 else ""),
        f"Fix the rows, or pass --on-error skip to leave them out (each is listed in the report). "
        f"All problems: {listing}",
    )


def _finish(cfg: DataConfig, scan: _Scan, staging: Path, emit: Emitter, cache_dir: Path) -> DataReport:
    rows = scan.rows
    n = len(rows)
    if n == 0:
        raise DataError(f"no usable rows among {scan.rows_read} read",
                        "See the problems listed above, or check --task and the field options.")
    embeddings = np.concatenate(scan.embeddings) if scan.embeddings else None
    near: dict[int, tuple[int, float]] = {}
    if embeddings is not None:
        emit.progress("finding near-duplicates", 0, 1)
        near = dedup.near_duplicates(embeddings, cfg.near_dup_threshold)
    kept = [i for i in range(n) if i not in near]
    assignment = split.assign([rows.label(i) for i in kept], cfg.split, cfg.seed,
                              stratify=cfg.task == "classification")
    where: list[str | None] = [None] * n  # the split of each row; None for a near-duplicate
    for row, split_name in zip(kept, assignment, strict=True):
        where[row] = split_name
    contaminated: dict[int, float] = {}
    if embeddings is not None:
        train_rows = [i for i in kept if where[i] == "train"]
        eval_rows = [i for i in kept if where[i] != "train"]
        found = dedup.contaminated(embeddings[eval_rows], embeddings[train_rows], cfg.contamination_threshold)
        contaminated = {eval_rows[j]: sim for j, sim in found.items()}
        for row in contaminated:  # an evaluation row the model has nearly seen: train on it instead
            where[row] = "train"
    emit.progress("writing splits", 1, 1)
    faults.point("data.splits")
    handles = {name: open(staging / f"{name}.jsonl", "w", encoding="utf-8") for name in SPLITS}  # noqa: SIM115
    try:
        with open(staging / "pool.jsonl", encoding="utf-8") as pool:
            for row, line in enumerate(pool):
                target = where[row]
                if target is not None:
                    handles[target].write(line)
    finally:
        for handle in handles.values():
            handle.close()
    split_counts = {s: where.count(s) for s in SPLITS}
    counts = Counts(rows_read=scan.rows_read, invalid=scan.problem_count, pii_dropped=scan.pii_dropped_count,
                    duplicates_exact=scan.exact_dup_count, duplicates_near=len(near), **split_counts,
                    moved_to_train=len(contaminated))
    accounted = sum(v for k, v in counts.model_dump().items() if k not in ("rows_read", "moved_to_train"))
    assert accounted == scan.rows_read, f"row accounting is off: {counts}"
    from appliance.data.lengths import length_stats

    final_rows = [row for row in range(n) if where[row] is not None]
    labels = None
    if cfg.task == "classification":
        seen = sorted({label for label in (rows.label(i) for i in final_rows) if label})
        labels = Labels(set=scan.spec.labels or seen,
                        distribution={s: _label_counts([rows.label(i) for i in final_rows if where[i] == s])
                                      for s in SPLITS})
    return DataReport(
        counts=counts,
        formats=scan.formats,
        problems=[records.Problem(**p.as_dict()) for p in scan.problems],  # the first MAX_LISTED; all in problems.jsonl
        file_problems=[records.Problem(**p.as_dict()) for p in scan.file_problems],
        pii=PiiReport(mode=cfg.pii, scope=cfg.pii_scope, region=cfg.pii_region, **scan.pii.as_dict(),
                      dropped=scan.pii_dropped, previews=scan.pii_previews,
                      detectors=pii_eval.detectors(scan.own, cfg.pii_recognizers, cfg.pii_entities,
                                                   cfg.pii_languages, cache_dir),
                      measured_on=pii_eval.measured_on(cfg.pii_languages),
                      not_detected=pii_eval.not_detected(cfg.pii_entities)),
        duplicates=Duplicates(
            exact=scan.exact_dups,
            near=[NearDuplicate(source=rows.source(r), duplicate_of=rows.source(k), cosine=round(s, 4))
                  for r, (k, s) in sorted(near.items())[:MAX_LISTED]],
            near_threshold=cfg.near_dup_threshold if cfg.near_dup else None),
        contamination=Contamination(
            checked=embeddings is not None, threshold=cfg.contamination_threshold,
            rows=[Contaminated(source=rows.source(r), cosine=round(s, 4)) for r, s in sorted(contaminated.items())]),
        labels=labels,
        lengths=(Lengths(**length_stats([rows.length[i] for i in final_rows], [rows.trained[i] for i in final_rows],
                                        cfg.max_seq_len)) if scan.tokenizer is not None else None),
        outputs={s: Output(rows=split_counts[s], path=f"{s}.jsonl") for s in SPLITS},
    )


def _cut(text: str, limit: int = 240) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _label_counts(labels: list[str | None]) -> dict[str, int]:
    out: dict[str, int] = {}
    for label in labels:
        out[str(label)] = out.get(str(label), 0) + 1
    return dict(sorted(out.items()))
