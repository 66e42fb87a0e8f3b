"""Validated configuration, one pydantic schema per stage.

This module is imported by the TUI, so it must stay light: pydantic only, no ML libraries.
Every field has a description and bounds; a bad value is reported with its field name.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from appliance.errors import ConfigError

MODEL_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
Dtype = Literal["bfloat16", "float16", "float32"]
MAX_SETTINGS_BYTES = 1024 * 1024  # a recipe or a template is a few lines; anything this large is not one


def shown(text: str) -> str:
    """Text as an error message can carry it: unchanged, except what UTF-8 cannot encode (a lone
    surrogate, from a command-line argument that was not UTF-8), which is escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def check_model_name(name: str) -> str:
    if not MODEL_NAME_RE.match(name):
        raise ValueError(
            f"{name!r} is not a valid model name: use 1-64 lowercase letters, digits, '.', '_' "
            "or '-', starting with a letter or digit"
        )
    return name


class Settings(dict[str, Any]):
    """Settings read from a file, remembering where each was written (`origins`: name -> "file:line"),
    so that a value the schema refuses can be traced to its line."""

    def __init__(self, values: dict[str, Any] | None = None, origins: dict[str, str] | None = None) -> None:
        super().__init__(values or {})
        self.origins: dict[str, str] = dict(origins or {})


def load_settings(path: Path, what: str = "recipe") -> Settings:
    """The `name: value` mapping of a YAML (or JSON) file such as a training recipe.

    Whatever is wrong with the file (missing, not UTF-8, broken YAML, not a mapping, a name that is
    not text or is written twice) is a ConfigError naming the file, and the line where there is one.
    The values themselves are checked by the stage's schema."""
    import yaml

    text = _settings_text(path, what)
    hint = f"Fix the {what} at that line: one `name: value` per line, e.g. `learning_rate: 0.0002`."
    loader = None
    try:
        loader = _settings_loader()(text)
        node = loader.get_single_node()
        origins = _setting_lines(path, node)
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        reason = "; ".join(part for part in (exc.problem, exc.context) if part) or "broken YAML"
        raise ConfigError(f"{where}: broken YAML: {reason}", hint) from exc
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        raise ConfigError(f"{path}:{line}: the character U+{code:04X} is not allowed in YAML",
                          f"Remove it from the {what}.") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: broken YAML: {exc}", hint) from exc
    except RecursionError as exc:
        raise ConfigError(f"{path}: lists and mappings are nested too deeply to be a {what}", hint) from exc
    finally:
        if loader is not None:
            loader.dispose()
    if data is None:  # an empty file, or only comments
        return Settings()
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a {what} is a mapping of setting names to values, not {_yaml_kind(data)}",
                          hint)
    odd = next((key for key in data if not isinstance(key, str)), None)
    if odd is not None:  # brought in by a `<<` merge: the names written in the file itself are checked above
        raise ConfigError(f"{path}: the setting name {odd!r} is not text", hint)
    return Settings(data, origins)


def _settings_text(path: Path, what: str) -> str:
    if path.exists() and not path.is_file():
        raise ConfigError(f"{path} is not a file", f"Give the path of the {what} file.")
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_SETTINGS_BYTES + 1)
    except FileNotFoundError as exc:
        raise ConfigError(f"no such {what}: {path}", "Check the path.") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror or exc}", "Check its permissions.") from exc
    if len(raw) > MAX_SETTINGS_BYTES:
        raise ConfigError(f"{path}: over {MAX_SETTINGS_BYTES // 1024 // 1024} MiB, too large to be a {what}",
                          f"Check that this is the {what} you meant.")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {exc.start})", "Save the file as UTF-8.") from exc


def _setting_lines(path: Path, node: Any) -> dict[str, str]:
    """Where each top-level name is written ("file:line"); a name that is not text, or is written twice,
    is a ConfigError that names its line."""
    from yaml.nodes import MappingNode, ScalarNode

    if not isinstance(node, MappingNode):
        return {}
    lines: dict[str, int] = {}
    for key, _value in node.value:
        line = key.start_mark.line + 1
        if key.tag == "tag:yaml.org,2002:merge":
            continue
        if not isinstance(key, ScalarNode) or key.tag != "tag:yaml.org,2002:str":
            written = key.value if isinstance(key, ScalarNode) else "a list or mapping"
            raise ConfigError(f"{path}:{line}: the setting name {written!r} is not text",
                              "Setting names are words such as learning_rate.")
        if key.value in lines:
            raise ConfigError(f"{path}:{line}: {key.value} is set twice (also on line {lines[key.value]})",
                              "Keep one of them.")
        lines[key.value] = line
    return {name: f"{path}:{line}" for name, line in lines.items()}


def _yaml_kind(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a single text"
    return "a single value"


@functools.cache
def _settings_loader() -> Any:
    import yaml

    class SettingsLoader(yaml.SafeLoader):
        """The safe YAML loader, with a value that cannot be built (a date such as 2024-02-30, a number with
        thousands of digits) reported at its line like any other YAML error."""

        def construct_object(self, node: Any, deep: bool = False) -> Any:
            try:
                return super().construct_object(node, deep)
            except yaml.YAMLError:
                raise
            except Exception as exc:
                written = node.value if isinstance(node.value, str) else ""
                written = written if len(written) <= 40 else written[:39] + "…"
                kind = str(node.tag).rsplit(":", 1)[-1]
                detail = f": {exc}" if isinstance(exc, ValueError | ArithmeticError) and len(str(exc)) < 200 else ""
                raise yaml.constructor.ConstructorError(None, None, f"{written!r} is not a valid {kind}{detail}",
                                                        node.start_mark) from exc

    return SettingsLoader


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # settings that describe one start of a stage rather than the stage (run.yaml leaves them out)
    not_recorded: ClassVar[tuple[str, ...]] = ()


class ImportConfig(StageConfig):
    """Bring a base model into the store."""

    source: str = Field(
        description="A catalog name ('default' for the embedded model), a Hugging Face-layout "
        "directory with safetensors weights, or a .gguf file",
        min_length=1,
    )
    name: str | None = Field(
        default=None, description="Name in the store; derived from the source when not given"
    )
    dtype: Dtype = Field(
        default="bfloat16",
        description="Precision of the weights written for a GGUF source (dequantized); "
        "a safetensors directory keeps its own",
    )
    copy_weights: bool = Field(
        default=False, description="Copy the weights of a folder on the store's file system instead of hard-linking "
        "them (a link takes no disk; a change to the source files in place would then change the store's copy, which "
        "`appliance verify` reports)",
    )
    store: str = Field(description="Path of the model store to import into")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str | None) -> str | None:
        return None if value is None else check_model_name(value)


class DataConfig(StageConfig):
    """Prepare training data: read, validate, clean, scrub PII, deduplicate, template, split."""

    inputs: list[str] = Field(min_length=1, description="Data files (JSONL, JSON, CSV, TSV, Parquet)")
    task: Literal["chat", "classification", "extraction"] = Field(
        default="chat", description="chat: conversations as given; classification: text -> label; "
        "extraction: text -> JSON matching a schema")
    file_type: Literal["jsonl", "json", "csv", "tsv", "parquet"] | None = Field(
        default=None, description="Override the file type detected from the extension")
    format: Literal["auto", "openai", "sharegpt", "alpaca", "prompt_completion", "table"] = Field(
        default="auto", description="Record convention; detected from the first valid row when auto")
    delimiter: str | None = Field(default=None, min_length=1, max_length=1,
                                  description="Column delimiter of CSV/TSV files")
    text_field: str = Field(default="text", description="Column holding the input text")
    label_field: str = Field(default="label", description="Column holding the label (classification)")
    output_field: str = Field(default="output", description="Column holding the JSON answer (extraction)")
    labels: list[str] | None = Field(default=None, description="Allowed labels; collected from the data when "
                                     "not given")
    schema_path: str | None = Field(default=None, description="JSON schema file of the extraction output",
                                    json_schema_extra={"option": "--schema"})
    template_path: str | None = Field(default=None, description="YAML/JSON file with system/user/assistant "
                                      "Jinja templates that turn a row into a conversation",
                                      json_schema_extra={"option": "--template"})
    on_error: Literal["fail", "skip"] = Field(default="fail", description="fail: stop and list every bad row; "
                                              "skip: leave bad rows out, each listed with its reason")
    pii: Literal["report", "redact", "drop"] = Field(default="redact", description="What to do with PII")
    pii_region: str = Field(default="US", min_length=2, max_length=2,
                            description="Region for phone numbers written without a country code, and whose "
                            "plain-digit national IDs (NHS, German tax ID, BSN) are found without their name")
    pii_scope: Literal["conversation", "dataset"] = Field(
        default="conversation", description="Where one placeholder stands for one value: within a conversation, "
        "or across the whole dataset (<EMAIL_3> is the same address in every row)")
    pii_recognizers: str | None = Field(default=None, description="YAML file of your organisation's own "
                                        "identifiers (pattern or words, context, examples), redacted as PII")
    pii_entities: list[Literal["names", "addresses", "locations", "organisations"]] = Field(
        default=["names", "addresses"], description="Entities found besides the checked identifiers: names, "
        "addresses, locations, organisations ('' for none). Names, places and organisations use spaCy's models "
        "(--pii-languages) with a name gazetteer and titles; addresses are street-and-number rules")
    pii_languages: list[Literal["en", "fr"]] = Field(
        default=["en"], min_length=1, description="Languages of the text, for names, places and organisations: "
        "en (spaCy's en_core_web_sm), fr (fr_core_news_sm); with both, each text is read by the model of the "
        "language its common words belong to")
    dedup: bool = Field(default=True, description="Remove exact duplicates")
    near_dup: bool = Field(default=True, description="Remove near-duplicates (sentence embeddings)")
    near_dup_threshold: float = Field(default=0.95, ge=0.5, le=1.0, description="Cosine similarity above "
                                      "which two rows are near-duplicates")
    contamination_threshold: float = Field(default=0.9, ge=0.5, le=1.0, description="Cosine similarity "
                                           "above which a validation/test row repeats a training row")
    split: tuple[float, float, float] = Field(default=(0.8, 0.1, 0.1), description="train, val, test fractions")
    seed: int = Field(default=0, ge=0, description="Seed of the split")
    model: str | None = Field(default=None, description="Base model whose chat template and tokenizer are "
                              "used for lengths; the store's default when not given")
    max_seq_len: int = Field(default=1024, ge=16, le=131072, description="Longest templated row in tokens")
    truncate: bool = Field(default=False, description="Keep rows over max_seq_len (training truncates them) "
                           "instead of treating them as errors")
    templating: bool = Field(default=True, description="Apply the model's chat template and count tokens")
    store: str = Field(description="Path of the model store")

    @field_validator("split")
    @classmethod
    def _split_sums_to_one(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        # written so that NaN fails too (every comparison with NaN is false)
        if not (all(v >= 0 for v in value) and abs(sum(value) - 1.0) <= 1e-6 and value[0] > 0):
            raise ValueError("split needs three non-negative fractions (train, val, test) that sum to 1, "
                             "with some training data, e.g. 0.8,0.1,0.1")
        return value

    @field_validator("delimiter", mode="before")
    @classmethod
    def _tab_as_written(cls, value: Any) -> Any:
        return "\t" if value == "\\t" else value  # `--delimiter '\t'` as typed in a shell

    @field_validator("pii_entities", "pii_languages")
    @classmethod
    def _each_once(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))  # "names,names" is names

    @field_validator("pii_region", mode="before")
    @classmethod
    def _region_in_capitals(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("delimiter")
    @classmethod
    def _delimiter_can_delimit(cls, value: str | None) -> str | None:
        if value is not None and value in "\"\r\n":
            raise ValueError("a quote or a line break cannot separate columns: give another character, e.g. ';'")
        return value


class TrainConfig(StageConfig):
    """Fine-tune a base model on a run's prepared data (LoRA, QLoRA or full)."""

    not_recorded: ClassVar[tuple[str, ...]] = ("resume",)

    base_model: str | None = Field(default=None, description="Store name of the base model; the store's "
                                   "default when not given")
    method: Literal["lora", "qlora", "full"] = Field(default="lora", description="lora: 16/32-bit base + "
                                                     "adapter; qlora: 4-bit NF4 base (CUDA); full: every weight")
    rank: int = Field(default=16, ge=1, le=1024, description="LoRA rank")
    alpha: int = Field(default=32, ge=1, le=4096, description="LoRA alpha (scale = alpha / rank)")
    dropout: float = Field(default=0.0, ge=0.0, le=0.5, description="LoRA dropout")
    target_modules: list[str] | Literal["all-linear"] = Field(default="all-linear", description="Layers that get "
                                                             "adapters: all linear layers, or a list of names")
    learning_rate: float = Field(default=2e-4, gt=0, le=1.0, description="Peak learning rate")
    scheduler: Literal["cosine", "linear", "constant"] = Field(default="cosine", description="Decay after warmup")
    warmup_ratio: float = Field(default=0.05, ge=0.0, le=0.5, description="Share of steps spent warming up")
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0, description="AdamW weight decay")
    epochs: float = Field(default=1.0, gt=0, le=100, description="Passes over the training split")
    max_steps: int | None = Field(default=None, ge=1, le=10_000_000, description="Stop after this many "
                                  "optimizer steps (overrides epochs)")
    max_minutes: float | None = Field(default=None, gt=0, le=1_000_000, description="Time budget of training: "
                                      "the steps that fit are measured on the first steps and the learning-rate "
                                      "schedule follows them; at the budget the adapter is evaluated and saved")
    batch_size: int = Field(default=4, ge=1, le=1024, description="Rows per forward pass")
    grad_accum: int = Field(default=1, ge=1, le=1024, description="Forward passes per optimizer step")
    max_seq_len: int = Field(default=1024, ge=16, le=131072, description="Longer rows are truncated")
    batching: Literal["length_grouped", "random"] = Field(default="length_grouped", description="Group rows of "
                                                         "similar length into a batch (less padding) or not")
    gradient_checkpointing: bool = Field(default=False, description="Recompute activations: less memory, "
                                         "about 30% slower")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(default="auto", description="Compute "
                                                                     "precision of the base weights")
    seed: int = Field(default=0, ge=0, description="Seed of initialisation and data order")
    eval_every: int = Field(default=50, ge=1, description="Validation loss every this many steps")
    save_every: int = Field(default=50, ge=1, description="Checkpoint every this many steps")
    keep_checkpoints: int = Field(default=2, ge=1, le=100, description="How many recent checkpoints to keep")
    early_stopping_patience: int | None = Field(default=None, ge=1, description="Stop after this many "
                                                "evaluations without a better validation loss")
    early_stopping_metric: Literal["eval_loss", "task"] = Field(default="eval_loss", description="What early "
                                                                "stopping watches: the validation loss, or the task "
                                                                "metric (label accuracy of classification runs)")
    task_eval_items: int = Field(default=32, ge=0, le=100_000, description="Validation rows whose label accuracy "
                                 "is measured at each evaluation of a classification run (0: the loss only, "
                                 "which is much faster on a CPU)")
    backend: Literal["auto", "unsloth", "hf"] = Field(default="auto", description="Training library")
    init_from: str | None = Field(default=None, description="Run whose trained adapter (or model) this run "
                                  "starts from: sequential fine-tuning on new data")
    mix: dict[str, float] = Field(default_factory=dict, description="Multi-task: other runs whose training "
                                  "data is mixed in, each with a weight relative to this run's own data (1.0 = as "
                                  "many rows as this run has)")
    resume: bool = Field(default=False, description="Continue from the run's last complete checkpoint")
    processes: int = Field(default=1, ge=1, le=1024, description="Training processes on this machine (one per GPU; "
                           "on a CPU, each takes a share of the cores); more than one trains data-parallel through "
                           "accelerate with the hf backend")
    nodes: int = Field(default=1, ge=1, le=1024, description="Machines training together (each runs the same "
                       "command with its own --node-rank)")
    node_rank: int = Field(default=0, ge=0, description="This machine's place among the nodes (0 is the main one)")
    main_address: str | None = Field(default=None, description="HOST:PORT of node 0, where the processes meet "
                                      "(the only address a multi-node run connects to)")
    sharding: Literal["ddp", "fsdp"] = Field(default="ddp", description="ddp: every process holds the whole "
                                             "model; fsdp: weights, gradients and optimizer state are sharded "
                                             "across the processes (for a model too big for one device)")
    store: str = Field(description="Path of the model store")

    @property
    def world_size(self) -> int:
        """All training processes of the run, on every node."""
        return self.processes * self.nodes

    @field_validator("main_address")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"main_address {shown(value)} is not HOST:PORT (e.g. 10.0.0.5:29500)")
        return value

    @field_validator("mix")
    @classmethod
    def _weights_positive(cls, value: dict[str, float]) -> dict[str, float]:
        bad = [run for run, weight in value.items() if not 0 < weight <= 100]
        if bad:
            raise ValueError(f"mix weights must be in (0, 100]; check {', '.join(map(shown, bad))}")
        return value

    @model_validator(mode="after")
    def _task_metric_measured(self) -> TrainConfig:
        if self.early_stopping_metric == "task" and self.task_eval_items == 0:
            raise ValueError("early_stopping_metric task watches the label accuracy, which task_eval_items 0 turns "
                             "off: measure some rows, or watch eval_loss")
        return self

    @model_validator(mode="after")
    def _cluster_consistent(self) -> TrainConfig:
        if self.node_rank >= self.nodes:
            raise ValueError(f"node_rank {self.node_rank} is not among {self.nodes} node(s): ranks count from 0 to "
                             f"{self.nodes - 1}")
        if self.nodes > 1 and self.main_address is None:
            raise ValueError("a run on several nodes needs main_address: HOST:PORT of node 0, the same on every node")
        if (self.world_size > 1 or self.sharding == "fsdp") and self.backend == "unsloth":
            raise ValueError("the unsloth backend trains on one device: use backend hf (or auto) with several "
                             "processes")
        return self


SWEEPABLE = ("learning_rate", "rank", "alpha", "epochs", "batch_size")


class SweepConfig(StageConfig):
    """Short trainings over a grid of settings (or a random sample of it), ranked by validation loss: each
    trial is a training job of its own, on the run's prepared data."""

    train: TrainConfig = Field(description="The settings every trial starts from; each trial changes the grid's")
    grid: dict[str, list[int | float]] = Field(description="The settings to vary and the values to try: "
                                               + ", ".join(SWEEPABLE))
    sample: int | None = Field(default=None, ge=1, le=10_000, description="Random search: try only this many of "
                               "the combinations")
    store: str = Field(description="Path of the model store")

    @model_validator(mode="after")
    def _grid_of_valid_trials(self) -> SweepConfig:
        if not any(self.grid.values()):
            raise ValueError(f"nothing to sweep: give values of at least one of {', '.join(SWEEPABLE)}")
        unknown = [name for name in self.grid if name not in SWEEPABLE]
        if unknown:
            raise ValueError(f"{', '.join(map(shown, unknown))} cannot be swept: choose from {', '.join(SWEEPABLE)}")
        from pydantic import ValidationError

        base = self.train.model_dump()
        for name, values in self.grid.items():
            for value in values:  # a value that no trial could take is refused before any trial starts
                try:
                    TrainConfig.model_validate({**base, name: value})
                except ValidationError as exc:
                    reason = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
                    raise ValueError(f"{name} {value:g}: {reason}") from None
        return self


class ExportConfig(StageConfig):
    """Merge a run's adapter, convert to GGUF, quantize, verify, and sign the run's manifest."""

    quants: list[str] = Field(default_factory=lambda: ["Q4_K_M"], description="Quantizations to produce beside "
                              "the 16-bit reference: Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, Q3_K_M, Q2_K",
                              json_schema_extra={"option": "--quant"})
    outtype: Literal["f16", "bf16"] = Field(default="f16", description="Precision of the reference GGUF that "
                                            "is verified against the merged model and quantized from")
    lora_gguf: bool = Field(default=False, description="Also write the adapter alone as GGUF, with the base "
                            "model as GGUF, for serving base + adapter")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="Where to merge: auto uses the "
                                                   "GPU when it has room, else the CPU")
    name: str | None = Field(default=None, description="Name of the exported model (file names, Ollama, "
                             "server alias); <base model>-<run suffix> when not given")
    ppl_tokens: int = Field(default=4096, ge=64, le=10_000_000, description="Validation tokens scored for the "
                            "perplexity of each file (rows in order, whole rows only)")
    pre_tokenizer: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$",
                                      description="llama.cpp's name for how the tokenizer splits text "
                                      "(llama-bpe, qwen2, ...), for a BPE tokenizer its converter does not "
                                      "recognise; the gate checks the tokenization either way")
    cluster_gpu_gib: float = Field(default=24.0, gt=0, le=100_000, description="Memory of one GPU of the "
                                   "cluster that may serve the merged model with vLLM or TGI: sizes the "
                                   "tensor-parallel degree their launch scripts suggest")
    store: str = Field(description="Path of the model store")

    @field_validator("quants")
    @classmethod
    def _known_quants(cls, value: list[str]) -> list[str]:
        from appliance.quants import parse_quants

        return parse_quants(value)

    @field_validator("quants", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        """`Q8_0,Q4_K_M` in one setting, as in `--quant Q8_0,Q4_K_M`."""
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return [q.strip() for v in value for q in v.split(",") if q.strip()]
        return value

    @field_validator("name")
    @classmethod
    def _valid_export_name(cls, value: str | None) -> str | None:
        return None if value is None else check_model_name(value)


class EvalConfig(StageConfig):
    """Evaluate a run's targets on its test split with the same prompts, and compare them."""

    targets: list[str] | None = Field(default=None, description="base, fewshot, tuned, merged, gguf:QUANT "
                                      "(or gguf for every exported file); base, fewshot, tuned and every exported "
                                      "GGUF when not given")
    split: Literal["test", "val"] = Field(default="test", description="Prepared split to evaluate on")
    max_items: int | None = Field(default=None, ge=1, description="Evaluate only the first N items of the split")
    fewshot_k: int = Field(default=3, ge=0, le=32, description="Training examples put before each question for "
                           "the few-shot target")
    fewshot_select: Literal["similar", "random"] = Field(default="similar", description="Choose the examples by "
                                                         "sentence-embedding similarity to the question, or at random")
    max_new_tokens: int | None = Field(default=None, ge=1, le=8192, description="Cap on generated tokens; set by "
                                       "the task's longest reference when not given")
    tolerance: float = Field(default=1.0, ge=0.0, le=100.0, description="Points of the primary metric a "
                             "quantization may lose against the fine-tuned model and still be recommended")
    resamples: int = Field(default=1000, ge=1, le=100_000, description="Bootstrap resamples behind every interval")
    seed: int = Field(default=0, ge=0, description="Seed of the bootstrap and of random few-shot examples")
    store: str = Field(description="Path of the model store")

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        named = ("base", "fewshot", "tuned", "merged", "gguf")
        bad = [t for t in value if t not in named and not t.startswith("gguf:")]
        if bad:
            raise ValueError(f"unknown targets {', '.join(map(shown, bad))}: use base, fewshot, tuned, merged, gguf or "
                             "gguf:QUANT")
        return value


class Sampling(StageConfig):
    """How the model picks each token when it answers."""

    temperature: float = Field(default=0.7, ge=0.0, le=2.0, description="0 always picks the likeliest token")
    top_p: float = Field(default=0.95, gt=0.0, le=1.0, description="Sample only from the tokens that make up this "
                         "much probability")
    top_k: int = Field(default=40, ge=0, le=1000, description="Sample only from this many likeliest tokens (0: all)")
    repeat_penalty: float = Field(default=1.1, ge=1.0, le=2.0, description="Penalty on repeating recent tokens")
    max_tokens: int = Field(default=512, ge=1, le=32_768, description="Longest answer, in tokens")
    seed: int | None = Field(default=None, ge=0, description="Seed of the sampler, for repeatable answers")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class ServeConfig(StageConfig):
    """An exported model as a local OpenAI-compatible endpoint."""

    model: str = Field(min_length=1, description="A run id, an exported model's name, or a .gguf path")
    quant: str | None = Field(default=None, description="Which verified file of the run: the evaluation's "
                              "recommendation, else Q4_K_M, when not given")
    host: str = Field(default="127.0.0.1", min_length=1, description="Address to listen on; anything but "
                      "loopback needs an API key")
    port: int = Field(default=8000, ge=1, le=65_535, description="Port to listen on")
    api_key: str | None = Field(default=None, min_length=16, repr=False, description="Bearer key every request "
                                "must carry (at least 16 characters)")
    cors_origins: list[str] = Field(default_factory=list, description="Browser origins allowed to call the "
                                    "endpoint; none when empty", json_schema_extra={"option": "--cors-origin"})
    n_ctx: int | None = Field(default=None, ge=256, le=131_072, description="Context window in tokens; the "
                              "model's own, capped at 4096, when not given", json_schema_extra={"option": "--ctx"})
    threads: int | None = Field(default=None, ge=1, le=1024, description="CPU threads; all cores when not given")
    max_body_kb: int = Field(default=1024, ge=1, le=65_536, description="Largest request body, in KiB; a larger "
                             "one gets 413")
    body_timeout_s: float = Field(default=30, gt=0, le=3600, description="How long a request body may take to "
                                  "arrive, in seconds; a slower one gets 408",
                                  json_schema_extra={"option": "--body-timeout"})
    max_tokens: int = Field(default=1024, ge=1, le=32_768, description="Cap on max_tokens of a request, and its "
                            "value when a request names none")
    max_queue: int = Field(default=8, ge=0, le=1024, description="Requests that may wait while one is answered; "
                           "more get 429")
    constrain: bool = Field(default=True, description="Hold answers of a classification run to its labels and "
                            "of an extraction run to its JSON schema, unless a request brings its own grammar "
                            "or response_format")
    system: str | None = Field(default=None, description="System prompt for requests without one; the training "
                               "system prompt when not given")
    log_prompts: bool = Field(default=False, description="Keep prompts and answers in the audit log, with PII "
                              "replaced by placeholders")
    audit_log: str | None = Field(default=None, description="Audit log (JSON lines); <store>/audit/serve.jsonl "
                                  "when not given")
    shutdown_timeout_s: int = Field(default=30, ge=0, le=3600, description="How long a SIGTERM waits for "
                                      "requests in flight before closing them, in seconds",
                                      json_schema_extra={"option": "--shutdown-timeout"})
    store: str = Field(description="Path of the model store")

    @model_validator(mode="after")
    def _key_beyond_loopback(self) -> ServeConfig:
        if not is_loopback(self.host) and self.api_key is None:
            raise ValueError(f"refusing to listen on {self.host} without an API key: anyone who can reach this "
                             "machine could use the model. Set one with --api-key-file or APPLIANCE_API_KEY, or "
                             "listen on 127.0.0.1")
        return self
