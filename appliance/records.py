"""The records of a run, as typed models: what one stage writes and another (or a front end) reads.

The data report, the export's verification record, each evaluation and the comparison of them, the
signed manifest, the merge record, the job record, and the result every stage hands back in its
`done` event. Stages build these models and write them through `appliance.run.Run`; the CLI, the
TUI, serving and the tests read them back through it, so a field is named in one place. Light:
pydantic only (the TUI imports this).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator

from appliance.config import DataConfig
from appliance.templating import ChatContract


class Record(BaseModel):
    """A record as written: unknown fields from a newer version are kept, not refused."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _derived_fields_are_not_read(cls, data: Any) -> Any:
        """What a record derives (`passed`) is written for its readers, and derived again when read back."""
        if isinstance(data, dict) and cls.model_computed_fields:
            return {k: v for k, v in data.items() if k not in cls.model_computed_fields}
        return data


# -- data ------------------------------------------------------------------------------------


class Problem(Record):
    """One thing wrong with one row: where (file, line, field) and why."""

    file: str
    line: int
    field: str = ""
    reason: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.field}: {self.reason}" if self.field else f"{where}: {self.reason}"


class Counts(Record):
    """Where every row read went: the parts (all but rows_read and moved_to_train) add up to rows_read."""

    rows_read: int = 0
    invalid: int = 0
    pii_dropped: int = 0
    duplicates_exact: int = 0
    duplicates_near: int = 0
    train: int = 0
    val: int = 0
    test: int = 0
    moved_to_train: int = 0  # of train: evaluation rows that nearly repeated a training row


class PiiDropped(Record):
    source: str
    types: list[str]


class PiiPreview(Record):
    """One message before (its PII masked) and after the data stage."""

    source: str
    role: str
    types: list[str]
    before: str
    after: str


class PiiMeasure(Record):
    """How a detector did on a labelled set: the appliance's own (pii_eval.py), or a rule's own examples."""

    precision: float
    recall: float
    n: int  # labelled values of the type


class PiiDetector(Record):
    types: list[str]
    method: str  # how it decides, in a sentence
    version: str  # the library (and its version) that decides
    measured: dict[str, PiiMeasure] = Field(default_factory=dict)


class PiiReport(Record):
    """What the data stage found and did, for the person who signs off on the data: per type how many and
    what was done, the detectors with their versions and measured precision and recall, and what is known not
    to be detected."""

    mode: str
    scope: str = "conversation"
    region: str = "US"
    rows_with_pii: int = 0
    counts: dict[str, int] = Field(default_factory=dict)
    masked_samples: dict[str, list[str]] = Field(default_factory=dict)
    dropped: list[PiiDropped] = Field(default_factory=list)
    previews: list[PiiPreview] = Field(default_factory=list)
    detectors: list[PiiDetector] = Field(default_factory=list)
    measured_on: str = ""  # what the detectors' precision and recall were measured on
    not_detected: list[str] = Field(default_factory=list)


class Duplicate(Record):
    source: str
    duplicate_of: str


class NearDuplicate(Duplicate):
    cosine: float


class Duplicates(Record):
    exact: list[Duplicate] = Field(default_factory=list)
    near: list[NearDuplicate] = Field(default_factory=list)
    near_threshold: float | None = None  # None: near-duplicates were not looked for


class Contaminated(Record):
    source: str
    cosine: float


class Contamination(Record):
    checked: bool = False
    threshold: float | None = None
    action: str = "moved to train"
    rows: list[Contaminated] = Field(default_factory=list)


class Labels(Record):
    set: list[str]
    distribution: dict[str, dict[str, int]] = Field(default_factory=dict)  # split -> label -> rows


class Bins(Record):
    edges: list[int]
    counts: list[int]


class Lengths(Record):
    """Templated lengths in tokens; `rows` 0 when nothing was measured."""

    rows: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    min: int = 0
    mean: float = 0.0
    p50: int = 0
    p95: int = 0
    max: int = 0
    histogram: dict[str, int] = Field(default_factory=dict)
    bins: Bins | None = None
    truncated: int = 0
    max_seq_len: int = 0
    padding_efficiency: float = 0.0
    packing_efficiency: float = 0.0


class Output(Record):
    rows: int
    path: str
    sha256: str | None = None


class InputFile(Record):
    path: str
    sha256: str
    bytes: int | None = None


class DataReport(Record):
    """`data/data_report.json`: every row read accounted for, and what the data stage found."""

    counts: Counts
    formats: dict[str, str] = Field(default_factory=dict)
    problems: list[Problem] = Field(default_factory=list)  # the first ones; all in problems.jsonl
    file_problems: list[Problem] = Field(default_factory=list)
    pii: PiiReport
    duplicates: Duplicates = Field(default_factory=Duplicates)
    contamination: Contamination = Field(default_factory=Contamination)
    labels: Labels | None = None
    lengths: Lengths | None = None
    outputs: dict[str, Output] = Field(default_factory=dict)
    inputs: list[InputFile] = Field(default_factory=list)
    config: DataConfig | None = None
    model: str | None = None  # whose chat template the rows were measured with
    seconds: float = 0.0

    @property
    def task(self) -> str:
        return self.config.task if self.config is not None else "chat"

    @property
    def label_set(self) -> list[str]:
        return list(self.labels.set) if self.labels is not None else []


class DataResult(BaseModel):
    run_dir: str
    data_dir: str
    counts: Counts
    pii: dict[str, int]
    seconds: float


# -- import and training -----------------------------------------------------------------------


class ImportResult(BaseModel):
    name: str
    path: str
    parameters: int
    dtype: str
    seconds: float


class TrainResult(BaseModel):
    adapter: str
    sha256: str
    backend: str
    method: str
    steps: int
    train_loss: float
    eval_loss: float | None
    real_tokens: int
    train_seconds: float
    peak_mem_mb: float
    seconds: float
    resumed_from: int | None = None


class SweepTrial(BaseModel):
    """One short training of a sweep, ranked by its validation loss."""

    trial: int
    settings: dict[str, Any]  # the values this trial changed
    dir: str
    eval_loss: float | None = None
    train_loss: float | None = None
    steps: int | None = None
    seconds: float | None = None
    error: str | None = None


class SweepResult(BaseModel):
    run: str
    grid: dict[str, list[Any]]
    trials: list[SweepTrial]  # best first

    @property
    def best(self) -> SweepTrial | None:
        return self.trials[0] if self.trials and self.trials[0].eval_loss is not None else None


# -- export ------------------------------------------------------------------------------------


Status = Literal["pass", "fail", "warn"]


class Check(Record):
    name: str
    status: Status
    detail: str


class FileReport(Record):
    """The verification gate's checks of one exported file."""

    file: str
    quant: str
    size_bytes: int
    checks: list[Check]
    agreement: float | None = None  # share of positions where llama.cpp picks the merged model's token
    ppl: float | None = None  # over every token of the validation rows
    answer_ppl: float | None = None  # over the trained (assistant) tokens only
    ppl_delta: float | None = None  # relative change of ppl against the 16-bit reference
    tensor_types: dict[str, int] = Field(default_factory=dict)
    note: str | None = None

    @computed_field  # type: ignore[prop-decorator]  # pydantic's documented use of a property
    @property
    def passed(self) -> bool:
        return all(c.status != "fail" for c in self.checks)


class Verification(Record):
    """`gguf/verification.json`: the files that passed the gate, the chat contract they carry, and how they
    were checked. A rejected folder keeps one too, without the contract."""

    run: str
    name: str | None = None
    created: str | None = None
    adapter_sha256: str | None = None
    reference: str | None = None
    ppl_tokens: int | None = None  # asked for (the export's --ppl-tokens)
    budget: str | None = None  # what the gate checked, with what budget, in words
    contract: ChatContract | None = None
    rejected: list[str] = Field(default_factory=list)
    rejected_dir: str | None = None
    files: list[FileReport] = Field(default_factory=list)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def passed(self) -> bool:
        return all(f.passed for f in self.files)

    def file(self, quant: str) -> FileReport | None:
        return next((f for f in self.files if f.quant == quant), None)

    def served(self) -> dict[str, FileReport]:
        """The files a runtime may load by themselves (not the adapter alone or its base), by quant."""
        return {f.quant: f for f in self.files if f.passed and f.quant not in ("LORA", "BASE")}


class MergeResult(Record):
    """`merged/merge.json`: which adapter the merged model holds, and how close it is to base + adapter."""

    merged: str
    adapter_sha256: str
    base_model: str
    dtype: str
    device: str
    reused: bool
    seconds: float
    tensors_merged: int = 0  # tensors the adapter changed
    check: str = "layer-wise"  # how the merged weights were checked
    max_relative_error: float | None = None  # the largest, over the changed tensors, of max|merged - reference|
    worst_tensor: str | None = None  # / max|reference| on random inputs: the rounding to the base's dtype


class ExportedFile(BaseModel):
    file: str
    path: str
    quant: str
    bytes: int
    predicted_bytes: int | None
    sha256: str
    passed: bool
    agreement: float | None
    ppl: float | None
    ppl_delta: float | None
    seconds: float  # to produce it (convert or quantize)
    note: str | None = None


class ExportResult(BaseModel):
    run: str
    name: str
    gguf_dir: str
    merged: MergeResult
    files: list[ExportedFile]
    rejected: list[str]
    rejected_dir: str | None
    modelfile: str | None
    commands: dict[str, str]
    manifest: str
    verify_seconds: float
    seconds: float
    budget: str | None = None  # what the gate checked, with what budget


# -- evaluation --------------------------------------------------------------------------------


class Interval(BaseModel):
    """A point estimate on all items and the bootstrap percentile interval around it."""

    low: float
    high: float
    point: float
    confidence: float = 0.95


class TargetResult(Record):
    """`eval/<target>.json`: one target's answers to the split and their scores."""

    target: str
    n: int
    primary: str
    score: Interval
    report: dict[str, Any]  # the task's report: per-label figures and the confusion matrix, fields, ...
    per_item: list[float]  # the primary metric per item, for paired comparisons
    size_bytes: int | None
    tokens_per_s: float
    seconds: float
    predictions: list[str]  # every item's answer, in the split's order
    samples: list[dict[str, Any]]  # the first items' reference and prediction
    runtime: str | None = None  # what ran it: "transformers, float32 on cpu", "llama.cpp, NAME-F16.gguf", ...

    def confusion(self) -> tuple[list[str], list[str], list[list[int]]] | None:
        """True labels, predicted columns and the matrix, for a classification target."""
        labels, matrix = self.report.get("labels"), self.report.get("confusion")
        if not labels or not matrix:
            return None
        return list(labels), list(self.report.get("confusion_columns") or labels), matrix


class TargetRow(Record):
    target: str
    score: Interval
    macro_f1: Interval | None = None
    size_bytes: int | None = None
    tokens_per_s: float = 0.0
    seconds: float = 0.0


class ComparisonRow(Record):
    baseline: str
    target: str
    metric: str
    baseline_score: float
    target_score: float
    difference: Interval
    significant: bool
    sentence: str


class Recommendation(Record):
    target: str
    file: str
    size_bytes: int
    tokens_per_s: float
    score: float
    difference: float  # against the fine-tuned model, in points
    reason: str


class EvalResult(Record):
    """`eval/comparison.json`, and the evaluation's result: every target side by side."""

    run: str
    task: str
    split: str
    n: int
    primary: str
    targets: list[TargetRow]
    comparisons: list[ComparisonRow]
    recommendation: Recommendation | None = None
    note: str | None = None
    seconds: float = 0.0

    def row(self, target: str) -> TargetRow | None:
        return next((r for r in self.targets if r.target == target), None)

    @property
    def headline(self) -> str | None:
        tuned = self.row("tuned")
        return f"tuned {self.primary} {tuned.score.point * 100:.1f}" if tuned is not None else None


# -- the manifest ------------------------------------------------------------------------------


class FileEntry(Record):
    sha256: str
    bytes: int


class BaseModelInputs(Record):
    name: str
    files: dict[str, FileEntry]


class ManifestInputs(Record):
    data: list[InputFile] = Field(default_factory=list)
    base_model: BaseModelInputs | None = None


class Signature(Record):
    algorithm: str
    key_id: str
    public_key: str = ""
    value: str = ""


class Manifest(Record):
    """`manifest.json`: the sha256 of every input and artifact, versions and results, signed. (The signature
    is checked on the file's own JSON, never on this model.)"""

    format: int = 1
    run: str = ""
    created: str
    versions: dict[str, str] = Field(default_factory=dict)
    inputs: ManifestInputs = Field(default_factory=ManifestInputs)
    files: dict[str, FileEntry] = Field(default_factory=dict)
    verification: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    signature: Signature | None = None

    def entries(self) -> list[tuple[str, str, FileEntry]]:
        """Every recorded file as (kind, name, entry): the data inputs, the base model's files, the run's."""
        rows = [("data", item.path, FileEntry(sha256=item.sha256, bytes=item.bytes or 0)) for item in self.inputs.data]
        base = self.inputs.base_model
        if base is not None:
            rows += [("base model", f"{base.name}/{name}", entry) for name, entry in base.files.items()]
        return rows + [("run", name, entry) for name, entry in self.files.items()]


# -- jobs --------------------------------------------------------------------------------------


class JobEntry(BaseModel):
    """One job started in a folder: where its events begin in events.jsonl, and its process."""

    stage: str
    offset: int = 0
    pid: int = 0
    started: float | None = None


class JobRecord(Record):
    """`job.json`: the last job's stage and settings, and every job started in the folder, oldest first."""

    stage: str
    config: dict[str, Any] = Field(default_factory=dict)
    pid: int = 0
    offset: int = 0
    started: float | None = None
    history: list[JobEntry] = Field(default_factory=list)

    def jobs(self) -> list[JobEntry]:
        """Every job, with the last one (records written before the history was kept have only that)."""
        last = JobEntry(stage=self.stage, offset=self.offset, pid=self.pid, started=self.started)
        if self.history and (self.history[-1].offset, self.history[-1].pid) == (self.offset, self.pid):
            return list(self.history)
        return [*self.history, last]


RESULTS: dict[str, type[BaseModel]] = {"import": ImportResult, "data": DataResult, "train": TrainResult,
                                       "export": ExportResult, "eval": EvalResult, "sweep": SweepResult}
