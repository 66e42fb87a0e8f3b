"""Sweep: short trainings over a grid of settings, started as one job, with the trials ranked by validation
loss as they finish (the table `appliance train sweep` prints). Every other setting is the run's training
settings (the Train screen's form)."""

from __future__ import annotations

from typing import ClassVar

from rich.markup import escape
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, DataTable, Footer, Header, Input, Label, Static

from appliance.config import SWEEPABLE, SweepConfig, TrainConfig
from appliance.errors import ApplianceError
from appliance.fields import fields, validated
from appliance.records import SweepResult
from tui.follow import JobEnded
from tui.screens.base import RunScreen
from tui.screens.train import starting_values
from tui.widgets.job_panel import JobPanel

GRID = {spec.name: spec.values_to_try() for spec in fields(TrainConfig) if spec.name in SWEEPABLE}


class SweepScreen(RunScreen):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+s", "start", "Sweep"),
        Binding("escape", "app.pop_screen", "Back", priority=True),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="sweep-top"):
            with Vertical(id="sweep-form"):
                yield Static(f"[b]Sweep[/b] {self.run_id}: values to try, comma-separated", id="sweep-title")
                for name, spec in GRID.items():
                    with Horizontal(classes="field"):
                        yield Label(spec.label, classes="field-label")
                        yield Input(id=f"g-{name}", placeholder=f"e.g. {_example(name)}", tooltip=Text(spec.help),
                                    compact=True)
                with Horizontal(classes="field"):
                    yield Label("steps per trial", classes="field-label")
                    yield Input("50", id="sweep-steps", compact=True)
                with Horizontal(classes="field"):
                    yield Label("sample", classes="field-label")
                    yield Input(id="sweep-sample", placeholder="all combinations", compact=True)
                yield Static("[dim]Every other setting is the run's training settings (F2).[/]", id="sweep-note")
                yield Button("Sweep", id="sweep-start", variant="primary", compact=True)
                yield Static("", id="sweep-errors")
            yield DataTable(id="sweep-table", zebra_stripes=True, cursor_type="row")
        yield JobPanel("sweep", idle="")
        yield Footer()

    def on_mount(self) -> None:
        self.show()
        self.last_job("sweep")

    def show(self) -> None:
        """The ranked trials of the run's last sweep."""
        table: DataTable[str] = self.query_one("#sweep-table", DataTable)
        table.clear(columns=True)
        try:
            result = self.run.sweep()
        except ApplianceError as exc:
            self.query_one("#sweep-errors", Static).update(f"[red]{escape(exc.message)}[/]")
            return
        if result is None:
            table.add_columns("no sweep yet")
            return
        grid = list(result.grid)
        table.add_columns("rank", *(GRID[k].label if k in GRID else k for k in grid), "eval loss", "train loss",
                          "seconds")
        for place, trial in enumerate(result.trials, 1):
            loss = f"{trial.eval_loss:.4f}" if trial.eval_loss is not None else (trial.error or "?")[:40]
            table.add_row(str(place), *(str(trial.settings.get(k, "")) for k in grid), loss,
                          f"{trial.train_loss:.4f}" if trial.train_loss is not None else "",
                          f"{trial.seconds:.0f}" if trial.seconds is not None else "")

    def config(self) -> SweepConfig | None:
        store = str(self.store.root)
        grid = {name: GRID[name].parse(box.value) for name in GRID
                if (box := self.query_one(f"#g-{name}", Input)).value.strip()}
        steps = self.query_one("#sweep-steps", Input).value.strip()
        sample = self.query_one("#sweep-sample", Input).value.strip()
        try:
            base = validated(TrainConfig, {**starting_values(self.run), "max_steps": steps, "store": store},
                             name=lambda field: "steps per trial" if field == "max_steps" else field)
            cfg: SweepConfig = validated(SweepConfig, {"train": base.model_dump(), "grid": grid,
                                                       "sample": sample or None, "store": store},
                                         name=lambda field: field)
        except ApplianceError as exc:
            self.query_one("#sweep-errors", Static).update(f"[red]{escape(exc.message)}[/]")
            return None
        self.query_one("#sweep-errors", Static).update("")
        return cfg

    @on(Button.Pressed, "#sweep-start")
    def action_start(self) -> None:
        panel = self.query_one(JobPanel)
        if panel.running:
            self.notify("The sweep is running.", severity="warning")
            return
        cfg = self.config()
        job = self.start_job("sweep", cfg) if cfg is not None else None
        if job is not None:
            panel.follow(job)

    @on(JobEnded)
    def _ended(self, message: JobEnded) -> None:
        if message.done is not None:
            best = SweepResult.model_validate(message.done.result).best
            self.query_one(JobPanel).say("[green]done[/]" + (f": best {escape(str(best.settings))}, validation loss "
                                                             f"{best.eval_loss:.4f}" if best is not None and
                                                             best.eval_loss is not None else ""))
        self.show()


def _example(name: str) -> str:
    return {"learning_rate": "1e-4,3e-4", "rank": "8,16", "alpha": "16,32", "epochs": "1,2",
            "batch_size": "2,4"}[name]
