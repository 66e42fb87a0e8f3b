"""The `appliance` command line: one command per stage, plus doctor and the model store.

Every command turns on the egress guard first. Errors the appliance raises on purpose print as a
title, a message and a hint, never as a traceback. Heavy libraries load only inside the commands
(or the child jobs) that need them, so `--help` stays instant.
"""

from __future__ import annotations

import json
import sys
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
    from pydantic import ValidationError

    from appliance.config import ImportConfig
    from appliance.errors import ConfigError

    st = store()
    try:
        cfg = ImportConfig(source=source, name=name, dtype=dtype, store=str(st.root))  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(problems, "See `appliance models import --help`.") from exc
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
                bar.update(task, description=event.phase, completed=event.step, total=event.total)
            elif isinstance(event, ev.Log) and event.level in ("warning", "error"):
                bar.console.print(f"[yellow]{event.level}:[/] {event.message}")

        return jobs.run(stage, job_dir, cfg, on_event)


def main() -> None:
    try:
        app()
    except ApplianceError as exc:
        err_console.print(f"[bold red]{exc.title}:[/] {exc.message}")
        if exc.hint:
            err_console.print(f"[dim]hint:[/] {exc.hint}")
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("[yellow]Interrupted.[/]")
        sys.exit(130)
