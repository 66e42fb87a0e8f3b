"""`appliance data`: prepare and sample data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from appliance.cli import JsonOpt, app, console, follow_job, print_json, store, validated

data_app = typer.Typer(help="Data preparation: validate, clean, scrub PII, deduplicate, template, split.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")

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
    cfg = validated(
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
    done = follow_job("data", run_dir, cfg, quiet=as_json, record=cfg.model_dump(mode="json"))
    if as_json:
        report = json.loads((Path(done.result["data_dir"]) / "data_report.json").read_text(encoding="utf-8"))
        print_json({"run": run_dir.name, **done.result, "report": report})
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


@data_app.command("inspect")
def data_inspect(
    inputs: Annotated[list[Path], typer.Argument(help="Data files: JSONL, JSON, CSV, TSV or Parquet")],
    file_type: Annotated[str | None, typer.Option(help="Override the file type: jsonl, json, csv, tsv, parquet")]
    = None,
    delimiter: Annotated[str | None, typer.Option(help="CSV delimiter, e.g. ';'")] = None,
    rows: Annotated[int, typer.Option(min=1, help="Rows read from the top of each file")] = 200,
    as_json: JsonOpt = False,
) -> None:
    """A first look: each file's type, record convention and columns, and the task and column mapping
    they most likely mean (with the `data prepare` command that uses them)."""
    from rich.markup import escape

    from appliance.data.inspect import inspect_file, suggest

    sep = delimiter.replace("\\t", "\t") if delimiter else None
    infos = [inspect_file(p, file_type, sep, rows) for p in inputs]
    suggestion = suggest(infos)
    command = _prepare_command(inputs, suggestion)
    if as_json:
        print_json({"files": [i.as_dict() for i in infos], "suggestion": suggestion.as_dict(), "command": command})
    else:
        for info in infos:
            if info.error:
                console.print(f"[red]{escape(info.path)}: {escape(info.error)}[/]", soft_wrap=True)
                continue
            table = Table(title=f"{info.path}: {info.kind}, {info.convention}, first {info.rows_sampled} rows"
                          + (f", {info.problems} unreadable" if info.problems else ""))
            for column in ("column", "filled", "distinct", "mean chars", "examples"):
                table.add_column(column)
            for c in info.columns:
                table.add_row(c.name, str(c.filled), str(c.distinct), f"{c.mean_chars:g}", " | ".join(c.examples))
            console.print(table)
        if any(i.error for i in infos):
            console.print("[red]Fix or leave out the files above, then inspect again.[/]")
        else:
            console.print(f"task: [b]{suggestion.task}[/b] ({suggestion.reason})")
            console.print(f"-> {command}", soft_wrap=True)
    if any(i.error for i in infos):
        raise typer.Exit(1)


def _prepare_command(inputs: list[Path], suggestion: Any) -> str:
    import shlex

    parts = ["appliance", "data", "prepare", *(shlex.quote(str(p)) for p in inputs), "--task", suggestion.task]
    for option, value in (("--text-field", suggestion.text_field), ("--label-field", suggestion.label_field),
                          ("--output-field", suggestion.output_field)):
        if value and suggestion.task != "chat":
            parts += [option, shlex.quote(value)]
    return " ".join(parts)


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


