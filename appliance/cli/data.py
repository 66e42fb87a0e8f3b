"""`appliance data`: prepare and sample data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from appliance.cli import JsonOpt, app, console, follow_job, print_json, store
from appliance.cli.options import Settings, config_options
from appliance.config import DataConfig
from appliance.fields import validated
from appliance.records import DataReport, DataResult

data_app = typer.Typer(help="Data preparation: validate, clean, scrub PII, deduplicate, template, split.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")

@data_app.command("prepare")
@config_options(DataConfig, arguments=("inputs",))
def data_prepare(
    settings: Settings,
    run: Annotated[str | None, typer.Option(help="The run to prepare the data for: an existing run, or the name of "
                                            "a new one (default: a new run named by the time)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Prepare training data into runs/<run>/data: train/val/test splits and data_report.json."""
    st = store()
    cfg = validated(DataConfig, {**settings, "store": str(st.root)})
    target = st.run_or_new(run)
    done = follow_job("data", target.path, cfg, DataResult, quiet=as_json)
    report = target.require_data_report()
    if as_json:
        print_json({"run": target.id, **done.model_dump(mode="json"), "report": report.model_dump(mode="json")})
        return
    print_data_summary(target.id, report, target.data_dir)


def print_data_summary(run_id: str, report: DataReport, data_dir: Path) -> None:
    counts = report.counts
    table = Table(title=f"Prepared data of run {run_id}")
    table.add_column("rows")
    table.add_column("count", justify="right")
    for key, value in counts.model_dump().items():
        table.add_row(key.replace("_", " "), str(value))
    console.print(table)
    pii = report.pii
    if pii.counts:
        pii_table = Table(title=f"PII found ({pii.mode})")
        for column in ("type", "count", "masked samples"):
            pii_table.add_column(column)
        for kind, count in pii.counts.items():
            pii_table.add_row(kind, str(count), ", ".join(pii.masked_samples.get(kind, [])))
        console.print(pii_table)
    if pii.not_detected:
        console.print(f"PII not detected by this version: {'; '.join(pii.not_detected)} (the detectors, their "
                      "versions and measured precision and recall are in the data report)", soft_wrap=True)
    lengths = report.lengths
    if lengths is not None and lengths.rows:
        console.print(f"tokens per row: median {lengths.p50}, p95 {lengths.p95}, max {lengths.max} "
                      f"(limit {lengths.max_seq_len}, truncated {lengths.truncated}); "
                      f"padding efficiency {lengths.padding_efficiency:.0%}, "
                      f"packing {lengths.packing_efficiency:.0%}")
    if report.labels is not None:
        console.print("labels: " + ", ".join(report.labels.set))
    if report.problems:
        console.print(f"[yellow]{counts.invalid} rows skipped[/]; first: {report.problems[0]}")
    console.print(f"-> {data_dir}")


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


