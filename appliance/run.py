"""A run folder: its paths, its records, the settings of every stage that ran in it, and their results.

Every stage writes through a `Run` and every reader (the CLI, the TUI, `runs.py`, evaluation, serving)
reads through one, so the layout of a run is spelled out here and nowhere else:

    runs/<run>/
      run.yaml                 the validated settings of every stage that ran (recorded by jobs.start)
      events.jsonl, job.json   the jobs' events and the job record (every job, oldest first)
      data/                    train/val/test splits, problems.jsonl, data_report.json, schema.json,
                               pii_recognizers.yaml (the rules its PII was found with, when given)
      checkpoints/step-N/      resumable training state
      adapter/                 the trained adapter (or whole model)
      merged/                  the 16-bit merged model and merge.json
      gguf/                    verified GGUF files, verification.json, Modelfile, launch scripts
      gguf-rejected/<time>/    files the gate refused, with their verification.json
      eval/                    one record per target, comparison.json
      sweep/                   a sweep's trials and results.json
      manifest.json            sha256 of every input and artifact, signed

No ML imports: the TUI and `--help` load this.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError

from appliance import events as ev
from appliance.errors import StoreError
from appliance.fsutil import atomic_write_text
from appliance.records import (
    RESULTS,
    DataReport,
    EvalResult,
    JobEntry,
    JobRecord,
    Manifest,
    MergeResult,
    SweepResult,
    TargetResult,
    Verification,
)

if TYPE_CHECKING:
    from appliance.store import Store

CONFIG = "run.yaml"
JOB_FILE = "job.json"
DATA = "data"
DATA_REPORT = "data_report.json"
SCHEMA = "schema.json"
PROBLEMS = "problems.jsonl"
FAILED_PROBLEMS = "data_problems.jsonl"  # every problem of a preparation that failed (data/ is not written then)
SPLITS = ("train", "val", "test")
ADAPTER = "adapter"
CHECKPOINTS = "checkpoints"
MERGED = "merged"
MERGE_RECORD = "merge.json"
GGUF = "gguf"
REJECTED = "gguf-rejected"
VERIFICATION = "verification.json"
EVAL = "eval"
COMPARISON = "comparison.json"
SWEEP = "sweep"
SWEEP_RESULTS = "results.json"
MANIFEST = "manifest.json"

R = TypeVar("R", bound=BaseModel)
Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Item:
    """A prepared row that ends in an answer: what every evaluation target is asked, and the answer."""

    prompt: Messages  # the conversation up to the answer
    reference: str  # the answer the data gives
    label: str | None = None  # classification rows carry their label


class Run:
    """One run folder of a store. Cheap to make; nothing is read until asked for."""

    def __init__(self, store: Store, path: Path) -> None:
        self.store = store
        self.path = path
        self.id = path.name

    @classmethod
    def at(cls, path: Path) -> Run:
        """The run in `path`, of the store that holds it (runs live in <store>/runs/<run>)."""
        from appliance.store import Store

        return cls(Store(path.parent.parent), path)

    def __repr__(self) -> str:
        return f"Run({self.path})"

    # -- paths -------------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def events_path(self) -> Path:
        return self.path / ev.EVENTS_FILE

    @property
    def data_dir(self) -> Path:
        return self.path / DATA

    def split_path(self, name: str) -> Path:
        return self.data_dir / f"{name}.jsonl"

    @property
    def data_report_path(self) -> Path:
        return self.data_dir / DATA_REPORT

    @property
    def schema_path(self) -> Path:
        """The JSON schema an extraction run's answers were checked against."""
        return self.data_dir / SCHEMA

    @property
    def failed_problems_path(self) -> Path:
        return self.path / FAILED_PROBLEMS

    @property
    def adapter_dir(self) -> Path:
        return self.path / ADAPTER

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def merged_dir(self) -> Path:
        return self.path / MERGED

    @property
    def gguf_dir(self) -> Path:
        return self.path / GGUF

    @property
    def rejected_dir(self) -> Path:
        return self.path / REJECTED

    @property
    def eval_dir(self) -> Path:
        return self.path / EVAL

    @property
    def sweep_dir(self) -> Path:
        return self.path / SWEEP

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    @property
    def verification_path(self) -> Path:
        return self.gguf_dir / VERIFICATION

    @property
    def comparison_path(self) -> Path:
        return self.eval_dir / COMPARISON

    def eval_path(self, target: str) -> Path:
        return self.eval_dir / f"{target.replace(':', '-')}.json"

    # -- what has been done ------------------------------------------------------------------

    @property
    def prepared(self) -> bool:
        return self.data_report_path.is_file()

    @property
    def trained(self) -> bool:
        return self.adapter_dir.is_dir()

    @property
    def exported(self) -> bool:
        return self.verification_path.is_file()

    @property
    def evaluated(self) -> bool:
        return self.comparison_path.is_file()

    # -- records -----------------------------------------------------------------------------

    def data_report(self) -> DataReport | None:
        return _read(self.data_report_path, DataReport, "Prepare the data again (appliance data prepare).")

    def require_data_report(self) -> DataReport:
        report = self.data_report()
        if report is None:
            raise StoreError(f"run {self.id} has no prepared data",
                             f"Prepare data first: appliance data prepare FILES --run {self.id}")
        return report

    def schema(self) -> dict[str, Any] | None:
        """The extraction schema the run was prepared with (None for other tasks)."""
        if not self.schema_path.is_file():
            return None
        try:
            schema: dict[str, Any] = json.loads(self.schema_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise StoreError(f"{self.schema_path} is unreadable or damaged: {exc}", "Prepare the data again.") \
                from exc
        return schema

    def verification(self, folder: Path | None = None) -> Verification | None:
        """The export's verification record (or the one of a folder of rejected files)."""
        return _read((folder or self.gguf_dir) / VERIFICATION, Verification,
                     f"Export again (appliance export --run {self.id}).")

    def merge_record(self) -> MergeResult | None:
        """What `merged/` holds; None when it is absent or was not written whole."""
        try:
            return MergeResult.model_validate_json((self.merged_dir / MERGE_RECORD).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def evaluation(self, target: str) -> TargetResult | None:
        return _read(self.eval_path(target), TargetResult, f"Evaluate again (appliance eval --run {self.id}).")

    def comparison(self) -> EvalResult | None:
        return _read(self.comparison_path, EvalResult, f"Evaluate again (appliance eval --run {self.id}).")

    def manifest(self) -> Manifest | None:
        return _read(self.manifest_path, Manifest, f"Export again (appliance export --run {self.id}).")

    def sweep(self) -> SweepResult | None:
        return _read(self.sweep_dir / SWEEP_RESULTS, SweepResult, "Run the sweep again.")

    # -- writing records (into the run, or into a folder being built for it) -----------------

    def write_data_report(self, report: DataReport, folder: Path | None = None) -> Path:
        return _write(report, (folder or self.data_dir) / DATA_REPORT)

    def write_schema(self, schema: dict[str, Any], folder: Path | None = None) -> Path:
        path = (folder or self.data_dir) / SCHEMA
        atomic_write_text(path, json.dumps(schema, indent=2, ensure_ascii=False) + "\n")
        return path

    def write_verification(self, record: Verification, folder: Path | None = None) -> Path:
        return _write(record, (folder or self.gguf_dir) / VERIFICATION)

    def write_merge_record(self, record: MergeResult, folder: Path) -> Path:
        return _write(record, folder / MERGE_RECORD)

    def write_evaluation(self, result: TargetResult) -> Path:
        return _write(result, self.eval_path(result.target))

    def write_comparison(self, result: EvalResult) -> Path:
        return _write(result, self.comparison_path)

    def write_sweep(self, result: SweepResult) -> Path:
        return _write(result, self.sweep_dir / SWEEP_RESULTS)

    # -- prepared rows -----------------------------------------------------------------------

    def rows(self, split: str) -> Iterator[dict[str, Any]]:
        """The prepared rows of a split ({"messages": [...], "label": ...}); none when it is absent."""
        path = self.split_path(split)
        if not path.is_file():
            return
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    row: dict[str, Any] = json.loads(line)
                    yield row

    def items(self, split: str, limit: int | None = None) -> list[Item]:
        """The rows of a split that end in an answer, as prompts and references."""
        items: list[Item] = []
        for row in self.rows(split):
            messages = row["messages"]
            last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
            if last < 0:
                continue
            items.append(Item(prompt=messages[:last], reference=messages[last]["content"], label=row.get("label")))
            if limit is not None and len(items) >= limit:
                break
        return items

    # -- settings of the stages (run.yaml) ---------------------------------------------------

    def config(self) -> dict[str, Any]:
        """The recorded settings of every stage ({} before the first); a damaged run.yaml is a StoreError."""
        import yaml

        if not self.config_path.is_file():
            return {}
        try:
            data = yaml.safe_load(self.config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise StoreError(f"{self.config_path} is unreadable or damaged: {exc}",
                             "Each stage records its settings there; run the stage again to rewrite it.") from exc
        return data if isinstance(data, dict) else {}

    def settings(self, stage: str) -> dict[str, Any]:
        """The settings one stage last ran with ({} when none are recorded)."""
        section = self.config().get(stage)
        if section is None:
            return {}
        if not isinstance(section, dict) or not all(isinstance(k, str) for k in section):
            raise StoreError(f"{self.config_path}: the {stage} settings are damaged (not a mapping of names to "
                             "values)", f"Start the {stage} stage again with its settings.")
        return dict(section)

    def record(self, stage: str, config: BaseModel) -> None:
        """Keep the whole validated config of a stage in run.yaml (jobs.start calls this, whichever front end
        started the job). Settings that describe one start rather than the stage (a resume) are left out."""
        import yaml

        exclude = set(getattr(config, "not_recorded", ()))
        data = self.config()
        data[stage] = config.model_dump(mode="json", exclude=exclude)
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
        if yaml.safe_load(text) != data:  # PyYAML writes some characters (U+0085) raw that it reads back otherwise
            text = yaml.safe_dump(data, sort_keys=False, allow_unicode=False)
        atomic_write_text(self.config_path, text)

    @property
    def task(self) -> str:
        """chat, classification or extraction: what the data was prepared for."""
        report = self.data_report()
        if report is not None:
            return report.task
        return str(self._quiet_settings("data").get("task") or "chat")

    def base_model_name(self) -> str | None:
        """The base model the run names: its training's, else the one its data was templated with (None: the
        store's default)."""
        name = self._quiet_settings("train").get("base_model") or self._quiet_settings("data").get("model")
        return str(name) if name is not None else None

    def base_model(self, chosen: str | None = None) -> str:
        """The imported base model of this run (or `chosen`, when named); a StoreError that says how to get it
        otherwise."""
        return self.store.resolve_model(chosen or self.base_model_name(), "base model of this run",
                                        "Import the base model the run was trained on (appliance models import ...).")

    def base_model_dir(self) -> Path:
        return self.store.model_dir(self.base_model())

    def _quiet_settings(self, stage: str) -> dict[str, Any]:
        try:
            return self.settings(stage)
        except StoreError:
            return {}  # what the run names is a hint here; the stage that needs the settings explains the damage

    # -- jobs and their results --------------------------------------------------------------

    def job_record(self) -> JobRecord | None:
        return job_record(self.path)

    def last_job(self, stage: str | None = None) -> tuple[JobEntry, int | None] | None:
        """The last job started in the run (of `stage`, when given), with where its events end (None: at the end
        of the file, it is the last job)."""
        return last_job(self.path, stage)

    def result(self, stage: str) -> BaseModel | None:
        """The typed result of the last job of `stage` that finished (None when it failed, runs, or never ran)."""
        found = self.last_job(stage)
        if found is None:
            return None
        entry, end = found
        done = next((e for e in ev.read_all(self.events_path, entry.offset, end) if isinstance(e, ev.Done)), None)
        if done is None:
            return None
        try:
            return RESULTS[stage].model_validate(done.result)
        except ValidationError:
            return None  # written by an older version: what it said is in events.jsonl


def job_record(folder: Path) -> JobRecord | None:
    """The job record of a run or job folder; None when no job was started there (or it is unreadable)."""
    try:
        return JobRecord.model_validate_json((folder / JOB_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_job_record(folder: Path, record: JobRecord) -> None:
    atomic_write_text(folder / JOB_FILE, record.model_dump_json(indent=2) + "\n")


def last_job(folder: Path, stage: str | None = None) -> tuple[JobEntry, int | None] | None:
    """The last job of a folder (of `stage`, when given) and the offset where the next job's events begin."""
    record = job_record(folder)
    if record is None:
        return None
    jobs = record.jobs()
    for index in range(len(jobs) - 1, -1, -1):
        if stage is None or jobs[index].stage == stage:
            end = jobs[index + 1].offset if index + 1 < len(jobs) else None
            return jobs[index], end
    return None


def exported_models(store: Store) -> dict[str, Run]:
    """Every exported model in the store, by the name its export gave it. A run folder copied under another
    name carries its source's record: the name stays with the run that made the export."""
    found: dict[str, Run] = {}
    for run in store.runs():
        try:
            record = run.verification()
        except StoreError:
            continue  # a damaged export serves nothing; `appliance verify` names it
        if (record is not None and record.name and record.contract is not None
                and (record.name not in found or record.run == run.id)):
            found[record.name] = run
    return found


def plain_name(name: object) -> bool:
    """A file name as records keep them: no folders, no way out of the folder that holds the record."""
    return isinstance(name, str) and name == Path(name).name and name not in ("", ".", "..")


def _read(path: Path, model: type[R], hint: str) -> R | None:
    if not path.is_file():
        return None
    try:
        return model.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        detail = f"{exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}" if isinstance(exc, ValidationError) else exc
        raise StoreError(f"{path} is unreadable or damaged: {detail}", hint) from exc


def _write(record: BaseModel, path: Path) -> Path:
    atomic_write_text(path, record.model_dump_json(indent=2, exclude_none=False) + "\n")
    return path
