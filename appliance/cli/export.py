"""`appliance export` and `appliance verify`: verified GGUF files and the signed audit manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from appliance.cli import JsonOpt, app, console, err_console, follow_job, print_json, store
from appliance.cli.options import Settings, config_options
from appliance.config import ExportConfig
from appliance.fields import validated
from appliance.records import ExportResult


def _mib(size: int | None) -> str:
    return f"{size / 2**20:,.0f} MiB" if size is not None else "?"


def _quant_table(model_dir: Path) -> Table:
    from appliance import quants

    table = Table(title=f"Quantizations (sizes predicted for {model_dir.name})")
    for column in ("quant", "size", "K-quant fallback", "what it is"):
        table.add_column(column)
    for q in quants.QUANTS.values():
        predicted = quants.predict(model_dir, q.name)
        fallback = f"{predicted.fallback_tensors}/{predicted.quantized_tensors} tensors" if predicted.fallback_tensors \
            else ""
        name = f"{q.name} (recommended)" if q.name == quants.RECOMMENDED else q.name
        table.add_row(name, _mib(predicted.bytes), fallback, q.description)
    return table


@app.command()
@config_options(ExportConfig)
def export(
    settings: Settings,
    run: Annotated[str, typer.Option(help="Run whose trained adapter to export")],
    list_quants: Annotated[bool, typer.Option("--list-quants", help="Show the quantizations with their predicted "
                                              "sizes for this run, and exit")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Merge the adapter, convert to GGUF, quantize, verify every file, and sign the run's manifest."""
    st = store()
    target = st.run(run)
    if list_quants:
        console.print(_quant_table(target.merged_dir if target.merged_dir.is_dir() else target.base_model_dir()))
        return
    cfg = validated(ExportConfig, {**settings, "store": str(st.root)})
    result = follow_job("export", target.path, cfg, ExportResult, quiet=as_json)
    if as_json:
        print_json(result.model_dump(mode="json"))
    else:
        _print_export(result)
    if result.rejected:
        err_console.print(f"[bold red]Verification failed:[/] {', '.join(result.rejected)} did not pass the gate; "
                          f"kept for inspection in {result.rejected_dir} (its verification.json says why). "
                          "The files that passed are registered.", soft_wrap=True)
        raise typer.Exit(1)


def _print_export(result: ExportResult) -> None:
    merged = result.merged
    how = "reused" if merged.reused else f"{merged.seconds} s on {merged.device}"
    error = f", largest relative error {merged.max_relative_error:.1e}" if merged.max_relative_error is not None else ""
    console.print(f"merge: {how}, {merged.tensors_merged} tensors changed; check: {merged.check}{error}")
    table = Table(title=f"Exported {result.name} (run {result.run}) to {result.gguf_dir}")
    for column in ("quant", "gate", "size", "predicted", "agreement", "perplexity", "vs reference", "seconds"):
        table.add_column(column)
    for f in result.files:
        agreement = f"{f.agreement:.1%}" if f.agreement is not None else ""
        ppl = f"{f.ppl:.3f}" if f.ppl is not None else ""
        delta = f"{f.ppl_delta:+.2%}" if f.ppl_delta is not None else ""
        status = "[green]pass[/]" if f.passed else "[red]REJECTED[/]"
        predicted = _mib(f.predicted_bytes) if f.predicted_bytes else ""
        table.add_row(f.quant, status, _mib(f.bytes), predicted, agreement, ppl, delta, str(f.seconds))
    console.print(table)
    for f in result.files:
        if f.note:
            console.print(f"[dim]{f.note}[/]")
    if result.rejected:
        console.print(f"[red]Rejected by the verification gate:[/] {', '.join(result.rejected)} "
                      f"(kept in {result.rejected_dir})")
    console.print(f"[green]Verified[/] in {result.verify_seconds} s; files in {result.gguf_dir}; "
                  f"signed manifest {result.manifest}")
    if result.budget:
        console.print(f"[dim]checked: {result.budget}[/]")
    for label, command in result.commands.items():
        console.print(f"  {label}: [bold]{command}[/]", soft_wrap=True)


@app.command()
def verify(
    run: Annotated[str, typer.Argument(help="Run whose manifest to check")],
    as_json: JsonOpt = False,
) -> None:
    """Re-hash every file of a run's manifest and check its signature; name whatever changed."""
    from appliance import manifest

    report = manifest.verify(store().run(run))
    if as_json:
        print_json(report.model_dump())
    else:
        colour = "green" if report.signature == "valid" else "red"
        console.print(f"signature: [{colour}]{report.signature}[/]; {report.checked} files checked")
        for label, files in (("changed", report.changed), ("missing", report.missing),
                             ("not in the manifest", report.unrecorded)):
            for file in files:
                console.print(f"[red]{label}:[/] {file}")
        for file in report.unavailable:
            console.print(f"[dim]not checked (outside the store, no longer there): {file}[/]")
        console.print("[green]Verified: every file is as recorded.[/]" if report.ok else "[red]Verification failed.[/]")
    if not report.ok:
        raise typer.Exit(1)
