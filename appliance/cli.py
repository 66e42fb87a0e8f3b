"""The `appliance` command line: one command per stage, plus doctor and the model store.

Every command turns on the egress guard first. Errors the appliance raises on purpose print as a
title, a message and a hint, never as a traceback. Heavy libraries load only inside the commands
(or the child jobs) that need them, so `--help` stays instant.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from appliance import __version__, offline
from appliance.errors import ApplianceError
from appliance.store import ModelInfo, Store

app = typer.Typer(
    name="appliance",
    help="Offline fine-tuning of open LLMs: private data in, a verified local model out.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
models_app = typer.Typer(help="The model store: list, show, import and remove base models.",
                         no_args_is_help=True)
app.add_typer(models_app, name="models")
data_app = typer.Typer(help="Data preparation: validate, clean, scrub PII, deduplicate, template, split.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")

console = Console()
err_console = Console(stderr=True)
_state: dict[str, Any] = {"store": None}

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def store() -> Store:
    if _state["store"] is None:
        _state["store"] = Store.open(_state.get("store_path"))
    result: Store = _state["store"]
    return result


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _version_callback(value: bool) -> None:
    if value:
        console.print(f"appliance {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    store_path: Annotated[
        Path | None,
        typer.Option("--store", help="Model store folder (default: $APPLIANCE_HOME or ./models).",
                     envvar="APPLIANCE_HOME", show_envvar=True),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True,
                           help="Print the version and exit.")
    ] = False,
) -> None:
    _state["store_path"] = store_path
    _state["store"] = None
    from appliance.store import default_root

    offline.activate((store_path or default_root()) / "audit" / "egress.jsonl")


# -- doctor --------------------------------------------------------------------------------


@app.command()
def doctor(as_json: JsonOpt = False) -> None:
    """Check the installation: Python, torch and GPUs, memory, disk, backends, llama.cpp, offline guard."""
    from appliance import doctor as doc

    report = doc.run(store())
    if as_json:
        _print_json({"ok": report.ok, "checks": [c.model_dump() for c in report.checks],
                     "facts": report.facts})
    else:
        table = Table(title=f"appliance {__version__} doctor", show_lines=False)
        table.add_column("check")
        table.add_column("", width=4)
        table.add_column("detail")
        marks = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[red]FAIL[/]"}
        for check in report.checks:
            detail = check.detail + (f"\n[dim]-> {check.hint}[/]" if check.hint else "")
            table.add_row(check.name, marks[check.status], detail)
        console.print(table)
        console.print("[green]All good.[/]" if report.ok else "[red]Problems found: see the hints above.[/]")
    if not report.ok:
        raise typer.Exit(1)


# -- models --------------------------------------------------------------------------------


def _fmt_params(count: int) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"


@models_app.command("list")
def models_list(as_json: JsonOpt = False) -> None:
    """Imported base models, and catalog models that can be imported."""
    st = store()
    imported = st.list_models()
    names = {m.name for m in imported}
    available = [e for e in st.catalog() if e.name not in names]
    if as_json:
        _print_json({"models": [m.model_dump() for m in imported],
                     "available": [e.model_dump() for e in available]})
        return
    table = Table(title=f"Models in {st.root}")
    for column in ("name", "architecture", "params", "context", "dtype", "chat", "license"):
        table.add_column(column)
    for m in imported:
        table.add_row(m.name, m.architecture, _fmt_params(m.parameters), str(m.context_length or "?"),
                      m.dtype, "yes" if m.chat_template else "no", m.license or "?")
    console.print(table)
    for entry in available:
        console.print(f"[dim]available: {entry.name} ({entry.description}); "
                      f"import with `appliance models import {entry.name}`[/]")


@models_app.command("show")
def models_show(name: str, as_json: JsonOpt = False) -> None:
    """Everything known about one imported model, with the sha256 of each file."""
    info: ModelInfo = store().get_model(name)
    if as_json:
        _print_json(info.model_dump())
        return
    rows = [
        ("name", info.name), ("architecture", f"{info.architecture} ({info.model_type})"),
        ("layers", str(info.num_layers)), ("hidden size", str(info.hidden_size)),
        ("parameters", f"{info.parameters:,} ({_fmt_params(info.parameters)})"),
        ("context length", str(info.context_length)), ("vocabulary", str(info.vocab_size)),
        ("dtype", info.dtype), ("chat template", "yes" if info.chat_template else "no"),
        ("special tokens", ", ".join(f"{k}={v}" for k, v in info.special_tokens.items() if v)),
        ("license", info.license or "unknown"),
        ("source", f"{info.source.kind}: {info.source.location}"
         + (f" ({info.source.package} {info.source.package_version})" if info.source.package else "")),
        ("imported", f"{info.imported_at} by appliance {info.appliance_version}"),
    ]
    table = Table(show_header=False, title=info.name)
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    files = Table(title="files")
    for column in ("file", "size", "sha256"):
        files.add_column(column)
    for fname, f in info.files.items():
        files.add_row(fname, f"{f.size:,}", f.sha256)
    console.print(files)
    for note in info.notes:
        console.print(f"[yellow]note:[/] {note}")


@models_app.command("import")
def models_import(
    source: Annotated[str, typer.Argument(help="'default', a catalog name, a model folder or a .gguf file")],
    name: Annotated[str | None, typer.Option(help="Name in the store (default: from the source)")] = None,
    dtype: Annotated[str, typer.Option(help="bfloat16, float16 or float32 (GGUF sources)")] = "bfloat16",
    as_json: JsonOpt = False,
) -> None:
    """Import a base model into the store, atomically, as a child job."""
    from appliance.config import ImportConfig

    st = store()
    cfg = _validated(ImportConfig, source=source, name=name, dtype=dtype, store=str(st.root))
    job_dir = st.new_job_dir("import")
    done = follow_job("import", job_dir, cfg, quiet=as_json)
    if as_json:
        _print_json(done.result)
    else:
        r = done.result
        console.print(f"[green]Imported[/] {r['name']}: {_fmt_params(r['parameters'])} parameters, "
                      f"{r['dtype']}, in {r['seconds']} s -> {r['path']}")


@models_app.command("remove")
def models_remove(
    name: str,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Remove an imported base model from the store."""
    st = store()
    st.get_model(name)
    if not yes and not typer.confirm(f"Remove {name} from {st.root}?"):
        raise typer.Exit(1)
    st.remove_model(name)
    console.print(f"Removed {name}.")


def _validated(cls: Any, **values: Any) -> Any:
    """Build a config, turning every validation problem into one readable error."""
    from pydantic import ValidationError

    from appliance.errors import ConfigError

    try:
        return cls(**values)
    except ValidationError as exc:
        problems = "; ".join(f"--{'.'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors())
        raise ConfigError(problems, "See --help for the allowed values.") from exc


def _describe_progress(event: Any) -> str:
    parts = [event.phase]
    if event.loss is not None:
        parts.append(f"loss {event.loss:.4f}")
    if event.tokens_per_s is not None:
        parts.append(f"{event.tokens_per_s:,.0f} tok/s")
    if event.mem_mb is not None:
        parts.append(f"{event.mem_mb / 1024:.1f} GiB")
    if event.eta_s is not None:
        parts.append(f"eta {int(event.eta_s) // 60}:{int(event.eta_s) % 60:02d}")
    return " · ".join(parts)


def follow_job(stage: str, job_dir: Path, cfg: Any, quiet: bool = False) -> Any:
    """Run a stage as a child job, rendering its events as a rich progress bar."""
    from appliance import events as ev
    from appliance import jobs

    if quiet:
        return jobs.run(stage, job_dir, cfg)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task(stage, total=None)

        def on_event(event: ev.Event) -> None:
            if isinstance(event, ev.Progress):
                bar.update(task, description=_describe_progress(event), completed=event.step, total=event.total)
            elif isinstance(event, ev.Log) and event.level in ("warning", "error"):
                bar.console.print(f"[yellow]{event.level}:[/] {event.message}")

        return jobs.run(stage, job_dir, cfg, on_event)


def main() -> None:
    try:
        app()
    except ApplianceError as exc:
        # soft_wrap: an error is one logical line however narrow the terminal, so it can be grepped
        from rich.markup import escape

        err_console.print(f"[bold red]{escape(exc.title)}:[/] {escape(exc.message)}", soft_wrap=True)
        if exc.hint:
            err_console.print(f"[dim]hint:[/] {escape(exc.hint)}", soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("[yellow]Interrupted.[/]")
        sys.exit(130)


# -- data ----------------------------------------------------------------------------------


def _csv_list(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@data_app.command("prepare")
def data_prepare(
    inputs: Annotated[list[Path], typer.Argument(help="Data files: JSONL, JSON, CSV, TSV or Parquet")],
    task: Annotated[str, typer.Option(help="chat, classification or extraction")] = "chat",
    file_type: Annotated[str | None, typer.Option(help="Override the file type: jsonl, json, csv, tsv, parquet")]
    = None,
    fmt: Annotated[str, typer.Option("--format", help="auto, openai, sharegpt, alpaca, prompt_completion, table")]
    = "auto",
    delimiter: Annotated[str | None, typer.Option(help="CSV delimiter, e.g. ';'")] = None,
    text_field: Annotated[str, typer.Option(help="Column with the input text")] = "text",
    label_field: Annotated[str, typer.Option(help="Column with the label (classification)")] = "label",
    output_field: Annotated[str, typer.Option(help="Column with the JSON answer (extraction)")] = "output",
    labels: Annotated[str | None, typer.Option(help="Allowed labels, comma-separated")] = None,
    schema: Annotated[Path | None, typer.Option(help="JSON schema of the extraction output")] = None,
    template: Annotated[Path | None, typer.Option(help="YAML/JSON with system/user/assistant Jinja templates")]
    = None,
    on_error: Annotated[str, typer.Option(help="fail (list every bad row and stop) or skip")] = "fail",
    pii: Annotated[str, typer.Option(help="report, redact or drop")] = "redact",
    pii_region: Annotated[str, typer.Option(help="Region for phone numbers without country code")] = "US",
    dedup: Annotated[bool, typer.Option(help="Remove exact duplicates")] = True,
    near_dup: Annotated[bool, typer.Option(help="Remove near-duplicates (sentence embeddings)")] = True,
    near_dup_threshold: Annotated[float, typer.Option(help="Cosine similarity of near-duplicates")] = 0.95,
    contamination_threshold: Annotated[float, typer.Option(help="Cosine similarity of contamination")] = 0.9,
    split: Annotated[str, typer.Option(help="train,val,test fractions")] = "0.8,0.1,0.1",
    seed: Annotated[int, typer.Option(help="Seed of the split")] = 0,
    model: Annotated[str | None, typer.Option(help="Base model for the chat template (default: the default)")]
    = None,
    max_seq_len: Annotated[int, typer.Option(help="Longest templated row, in tokens")] = 1024,
    truncate: Annotated[bool, typer.Option(help="Keep rows over --max-seq-len (training truncates them)")] = False,
    templating: Annotated[bool, typer.Option(help="Apply the chat template and count tokens")] = True,
    run: Annotated[str | None, typer.Option(help="Run id to prepare data for (default: a new run)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Prepare training data into runs/<run>/data: train/val/test splits and data_report.json."""
    from appliance.config import DataConfig

    st = store()
    try:
        fractions = tuple(float(v) for v in split.split(","))
    except ValueError:
        fractions = ()
    cfg = _validated(
        DataConfig, inputs=[str(p) for p in inputs], task=task, file_type=file_type, format=fmt,
        delimiter=delimiter.replace("\\t", "\t") if delimiter else None, text_field=text_field,
        label_field=label_field, output_field=output_field, labels=_csv_list(labels),
        schema_path=str(schema) if schema else None, template_path=str(template) if template else None,
        on_error=on_error, pii=pii, pii_region=pii_region.upper(), dedup=dedup, near_dup=near_dup,
        near_dup_threshold=near_dup_threshold, contamination_threshold=contamination_threshold,
        split=fractions, seed=seed, model=model, max_seq_len=max_seq_len, truncate=truncate,
        templating=templating, store=str(st.root),
    )
    run_dir = st.run_dir(run) if run else st.new_run_dir()
    st.record_config(run_dir, "data", cfg.model_dump(mode="json"))
    done = follow_job("data", run_dir, cfg, quiet=as_json)
    if as_json:
        report = json.loads((Path(done.result["data_dir"]) / "data_report.json").read_text(encoding="utf-8"))
        _print_json({"run": run_dir.name, **done.result, "report": report})
        return
    _print_data_summary(run_dir)


def _print_data_summary(run_dir: Path) -> None:
    report = json.loads((run_dir / "data" / "data_report.json").read_text(encoding="utf-8"))
    counts = report["counts"]
    table = Table(title=f"Prepared data of run {run_dir.name}")
    table.add_column("rows")
    table.add_column("count", justify="right")
    for key, value in counts.items():
        table.add_row(key.replace("_", " "), str(value))
    console.print(table)
    pii = report["pii"]
    if pii["counts"]:
        pii_table = Table(title=f"PII found ({pii['mode']})")
        for column in ("type", "count", "masked samples"):
            pii_table.add_column(column)
        for kind, count in pii["counts"].items():
            pii_table.add_row(kind, str(count), ", ".join(pii["masked_samples"].get(kind, [])))
        console.print(pii_table)
    if report.get("lengths"):
        lengths = report["lengths"]
        console.print(f"tokens per row: median {lengths['p50']}, p95 {lengths['p95']}, max {lengths['max']} "
                      f"(limit {lengths['max_seq_len']}, truncated {lengths['truncated']}); "
                      f"padding efficiency {lengths['padding_efficiency']:.0%}, "
                      f"packing {lengths['packing_efficiency']:.0%}")
    if report.get("labels"):
        console.print("labels: " + ", ".join(report["labels"]["set"]))
    if report["problems"]:
        console.print(f"[yellow]{counts['invalid']} rows skipped[/]; first: {report['problems'][0]}")
    console.print(f"-> {run_dir / 'data'}")


@data_app.command("sample")
def data_sample(
    out: Annotated[Path, typer.Argument(help="Where to write the sample CSV")],
) -> None:
    """Write the shipped sample dataset (IT-helpdesk tickets with categories and planted PII)."""
    import shutil

    from appliance.data.sample import shipped_path

    shutil.copyfile(shipped_path(), out)
    console.print(f"Wrote {out}: columns ticket_id, text, category. Try: appliance data prepare {out} "
                  "--task classification --text-field text --label-field category")


# -- train ---------------------------------------------------------------------------------


train_app = typer.Typer(help="Fine-tune on a run's prepared data (see also: train sweep).",
                        invoke_without_command=True)
app.add_typer(train_app, name="train")


def _parse_mix(values: list[str] | None) -> dict[str, float]:
    from appliance.errors import ConfigError

    mix: dict[str, float] = {}
    for value in values or []:
        run_id, _, weight = value.partition("=")
        try:
            mix[run_id] = float(weight or 1.0)
        except ValueError as exc:
            raise ConfigError(f"--mix {value!r}: the weight is not a number", "Write --mix RUN=0.5") from exc
    return mix


@train_app.callback()
def train(
    ctx: typer.Context,
    run: Annotated[str | None, typer.Option(help="Run whose prepared data to train on")] = None,
    resume: Annotated[str | None, typer.Option(help="Continue this run from its last checkpoint")] = None,
    recipe: Annotated[Path | None, typer.Option(help="YAML recipe with training settings")] = None,
    base_model: Annotated[str | None, typer.Option(help="Base model in the store (default: the default)")] = None,
    method: Annotated[str | None, typer.Option(help="lora, qlora or full")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many optimizer steps")] = None,
    epochs: Annotated[float | None, typer.Option(help="Passes over the training data")] = None,
    learning_rate: Annotated[float | None, typer.Option(help="Peak learning rate")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Rows per forward pass")] = None,
    max_seq_len: Annotated[int | None, typer.Option(help="Longest row in tokens")] = None,
    backend: Annotated[str | None, typer.Option(help="auto, unsloth or hf")] = None,
    rank: Annotated[int | None, typer.Option(help="LoRA rank")] = None,
    init_from: Annotated[str | None, typer.Option(help="Start from this run's trained adapter (sequential)")]
    = None,
    mix: Annotated[list[str] | None, typer.Option(help="Mix in another run's data: RUN=WEIGHT (repeatable)")]
    = None,
    as_json: JsonOpt = False,
) -> None:
    """Fine-tune on a run's prepared data, as a resumable job with checkpoints."""
    if ctx.invoked_subcommand is not None:
        return
    import yaml

    from appliance.config import TrainConfig

    st = store()
    if (run is None) == (resume is None):
        from appliance.errors import ConfigError

        raise ConfigError("give either --run RUN (a new training) or --resume RUN", "See appliance train --help.")
    run_dir = st.run_dir(resume or run or "")
    settings: dict[str, Any] = {}
    recorded = run_dir / "run.yaml"
    if resume and recorded.is_file():
        settings = dict((yaml.safe_load(recorded.read_text(encoding="utf-8")) or {}).get("train", {}))
    if recipe is not None:
        settings.update(yaml.safe_load(recipe.read_text(encoding="utf-8")) or {})
    overrides = {"base_model": base_model, "method": method, "max_steps": max_steps, "epochs": epochs,
                 "learning_rate": learning_rate, "batch_size": batch_size, "max_seq_len": max_seq_len,
                 "backend": backend, "rank": rank, "init_from": init_from, "mix": _parse_mix(mix) or None}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    settings.update(store=str(st.root), resume=resume is not None)
    cfg = _validated(TrainConfig, **settings)
    st.record_config(run_dir, "train", cfg.model_dump(mode="json", exclude={"resume"}))
    done = follow_job("train", run_dir, cfg, quiet=as_json)
    if as_json:
        _print_json({"run": run_dir.name, **done.result})
        return
    r = done.result
    eval_text = f", validation loss {r['eval_loss']:.4f}" if r.get("eval_loss") is not None else ""
    console.print(f"[green]Trained[/] {r['steps']} steps ({r['backend']}, {r['method']}): train loss "
                  f"{r['train_loss']:.4f}{eval_text}, {r['real_tokens']:,} tokens in {r['seconds']} s "
                  f"-> {r['adapter']}")


def _grid_values(text: str | None, cast: Callable[[str], Any]) -> list[Any] | None:
    return [cast(v) for v in text.split(",")] if text else None


@train_app.command("sweep")
def train_sweep(
    run: Annotated[str, typer.Option(help="Run whose prepared data the trials train on")],
    learning_rate: Annotated[str | None, typer.Option(help="Comma-separated values, e.g. 1e-4,3e-4")] = None,
    rank: Annotated[str | None, typer.Option(help="Comma-separated LoRA ranks, e.g. 8,16")] = None,
    epochs: Annotated[str | None, typer.Option(help="Comma-separated epoch counts")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Short budget per trial, in steps")] = 50,
    sample: Annotated[int | None, typer.Option(help="Random search: try only this many combinations")] = None,
    recipe: Annotated[Path | None, typer.Option(help="YAML recipe with the other settings")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Short trainings over a grid of learning rate, rank and epochs, ranked by validation loss."""
    import yaml

    from appliance.config import TrainConfig
    from appliance.errors import ConfigError
    from appliance.train.sweep import run_sweep

    st = store()
    run_dir = st.run_dir(run)
    grid = {k: v for k, v in {"learning_rate": _grid_values(learning_rate, float), "rank": _grid_values(rank, int),
                              "epochs": _grid_values(epochs, float)}.items() if v}
    if not grid:
        raise ConfigError("nothing to sweep", "Give at least one of --learning-rate, --rank, --epochs as a list.")
    settings: dict[str, Any] = dict(yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}) if recipe else {}
    settings.update(store=str(st.root), max_steps=max_steps)
    base = _validated(TrainConfig, **settings)
    for key, values in grid.items():
        for value in values:
            _validated(TrainConfig, **{**settings, key: value})
    ranked = run_sweep(base, run_dir, grid, sample)
    if as_json:
        _print_json({"run": run, "trials": ranked})
        return
    table = Table(title=f"Sweep of run {run}, ranked by validation loss")
    for column in ("rank", *grid.keys(), "eval loss", "train loss", "seconds"):
        table.add_column(column)
    for place, trial in enumerate(ranked, 1):
        loss = f"{trial['eval_loss']:.4f}" if trial.get("eval_loss") is not None else trial.get("error", "?")
        table.add_row(str(place), *(str(trial[k]) for k in grid), loss,
                      f"{trial.get('train_loss', float('nan')):.4f}", str(trial.get("seconds", "")))
    console.print(table)
