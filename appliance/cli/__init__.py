"""The `appliance` command line: one command per stage, plus doctor and the model store.

This module holds the app, the shared helpers and `doctor`; each stage's commands live in a
module of this package.

Every command turns on the egress guard first. Errors the appliance raises on purpose print as a
title, a message and a hint, never as a traceback. Heavy libraries load only inside the commands
(or the child jobs) that need them, so `--help` stays instant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from appliance import __version__, offline
from appliance.errors import ApplianceError
from appliance.store import Store

app = typer.Typer(
    name="appliance",
    help="Offline fine-tuning of open LLMs: private data in, a verified local model out.",
    invoke_without_command=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

console = Console()
err_console = Console(stderr=True)
_state: dict[str, Any] = {"store": None}

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def store() -> Store:
    if _state["store"] is None:
        _state["store"] = Store.open(_state.get("store_path"))
    result: Store = _state["store"]
    return result


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


def _version_callback(value: bool) -> None:
    if value:
        console.print(f"appliance {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
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
    if ctx.invoked_subcommand is None:  # `appliance` alone opens the terminal UI
        tui()


@app.command()
def tui() -> None:
    """Open the terminal UI: runs, training, chat, all from the keyboard."""
    from tui.app import build_app

    build_app(_state.get("store_path")).run()


# -- doctor --------------------------------------------------------------------------------


@app.command()
def doctor(as_json: JsonOpt = False) -> None:
    """Check the installation: Python, torch and GPUs, memory, disk, backends, llama.cpp, offline guard."""
    from appliance import doctor as doc

    report = doc.run(store())
    if as_json:
        print_json({"ok": report.ok, "checks": [c.model_dump() for c in report.checks],
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


R = TypeVar("R", bound=BaseModel)


def follow_job(stage: str, job_dir: Path, cfg: BaseModel, result: type[R], quiet: bool = False) -> R:
    """Run a stage as a child job, rendering its events as a rich progress bar; its typed result."""
    from appliance import events as ev
    from appliance import jobs

    if quiet:
        return result.model_validate(jobs.run(stage, job_dir, cfg).result)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task(stage, total=None)

        def on_event(event: ev.Event) -> None:
            if isinstance(event, ev.Progress):
                bar.update(task, description=escape(event.describe(steps=False)), completed=event.step,
                           total=event.total)
            elif isinstance(event, ev.Log) and event.level in ("warning", "error"):
                bar.console.print(f"[yellow]{event.level}:[/] {escape(event.message)}")

        return result.model_validate(jobs.run(stage, job_dir, cfg, on_event).result)


def main() -> None:
    try:
        app()
    except ApplianceError as exc:
        # soft_wrap: an error is one logical line however narrow the terminal, so it can be grepped
        err_console.print(f"[bold red]{escape(exc.title)}:[/] {escape(exc.message)}", soft_wrap=True)
        if exc.hint:
            err_console.print(f"[dim]hint:[/] {escape(exc.hint)}", soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("[yellow]Interrupted.[/]")
        sys.exit(130)


# The command groups register themselves on `app` when imported.
from appliance.cli import data, evaluate, export, models, plan, quickstart, serve, train  # noqa: E402,F401
