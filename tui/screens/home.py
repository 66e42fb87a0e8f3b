"""Home: is this machine ready (the doctor's summary), the store, and the runs with their state."""

from __future__ import annotations

from typing import Any, ClassVar

from rich.markup import escape
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.widgets import DataTable, Footer, Header, Static

from appliance.runs import RunSummary, list_runs
from tui.screens.base import AppScreen

STATE_STYLE = {"running": "bold cyan", "done": "green", "failed": "bold red", "stopped": "yellow", "idle": "dim"}
MARK = {"ok": "[green]✓[/]", "warn": "[yellow]![/]", "fail": "[red]✗[/]"}
# the doctor's checks worth a line on Home, with the label shown
SHOWN = {"gpu": "GPU", "memory": "memory", "backend unsloth": "Unsloth", "backend hf": "transformers",
         "4-bit (QLoRA)": "QLoRA", "llama.cpp runtime": "llama.cpp", "toolchain match": "toolchain",
         "egress guard": "offline guard"}


def doctor_summary(report: dict[str, Any]) -> str:
    lines = ["[b]This machine[/b]" + ("" if report.get("ok") else "  [red]problems found: run appliance doctor[/]")]
    for check in report.get("checks", []):
        if check["name"] in SHOWN:
            lines.append(f"{MARK.get(check['status'], '?')} {SHOWN[check['name']]}: {escape(check['detail'])}")
    return "\n".join(lines)


class HomeScreen(AppScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "open_run", "Open run", show=True),
        Binding("n", "new_run", "New run"),
        Binding("r", "refresh", "Refresh"),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="home-top"):
            yield Static("[b]This machine[/b]\nchecking…", id="doctor")
            yield Static(id="store")
        yield DataTable(id="runs", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        table: DataTable[Text] = self.query_one("#runs", DataTable)
        table.add_columns("run", "task", "done", "last job", "state", "detail")
        self.action_refresh()
        self.check_machine()

    @work(thread=True, exclusive=True, group="doctor", exit_on_error=False)
    def check_machine(self) -> None:
        report = self.appliance.doctor()
        self.app.call_from_thread(self.query_one("#doctor", Static).update, doctor_summary(report))

    def action_refresh(self) -> None:
        store = self.store
        runs = list_runs(store)
        models = store.list_models()
        self.query_one("#store", Static).update(
            f"[b]Store[/b] {escape(str(store.root))}\n{len(models)} base model(s): "
            + (escape(", ".join(m.name for m in models)) or "none: import one in Models") + f"\n{len(runs)} run(s)")
        table: DataTable[Text] = self.query_one("#runs", DataTable)
        selected = table.cursor_row
        table.clear()
        for run in runs:
            table.add_row(Text(run.id), Text(run.task or ""), Text(" ".join(run.stages) or "-"), Text(run.job or "-"),
                          Text(run.state, style=STATE_STYLE[run.state]), Text(run.headline or run.detail), key=run.id)
        if runs:
            table.move_cursor(row=min(selected, len(runs) - 1))

    def selected_run(self) -> RunSummary | None:
        table: DataTable[Text] = self.query_one("#runs", DataTable)
        if table.row_count == 0:
            return None
        run_id = str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)
        return next((r for r in list_runs(self.store) if r.id == run_id), None)

    @on(DataTable.RowSelected, "#runs")
    def _row_chosen(self) -> None:
        self.action_open_run()

    def action_open_run(self) -> None:
        run = self.selected_run()
        if run is None:
            self.notify("No run yet: press n to start one from your data.", severity="warning")
            return
        self.appliance.open_run(run.id)

    def action_new_run(self) -> None:
        self.appliance.new_run()
