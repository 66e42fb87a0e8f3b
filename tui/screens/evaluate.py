"""Evaluate: every target side by side with 95% intervals, the paired comparisons, the recommended
quantization, the confusion matrix of the target under the cursor and the predictions item by item."""

from __future__ import annotations

from typing import Any, ClassVar

from rich.markup import escape
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, DataTable, Footer, Header, Static, TabbedContent, TabPane

from appliance import jobs
from appliance.config import EvalConfig
from appliance.fsutil import read_json_object
from tui.follow import JobEnded
from tui.screens.run import RunScreen
from tui.widgets.job_panel import JobPanel


def interval(score: dict[str, Any] | None) -> str:
    if not score:
        return ""
    return f"{score['point'] * 100:.1f} [{score['low'] * 100:.1f}, {score['high'] * 100:.1f}]"


class EvaluateScreen(RunScreen):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+s", "start", "Evaluate"),
        Binding("escape", "app.pop_screen", "Back", priority=True),
    ]

    def __init__(self, run_id: str) -> None:
        super().__init__(run_id)
        self.reports: dict[str, dict[str, Any]] = {}

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="eval-head"):
            yield Static(f"[b]Evaluate[/b] {self.run_id}", id="eval-title")
            yield Button("Evaluate", id="eval-start", variant="primary", compact=True)
        with TabbedContent(id="eval-tabs"):
            with TabPane("Comparison", id="eval-comparison"), Vertical():
                yield DataTable(id="eval-table", cursor_type="row")
                yield Static("", id="eval-sentences")
            with TabPane("Confusion", id="eval-confusion-tab"):
                yield DataTable(id="eval-confusion")
            with TabPane("Predictions", id="eval-predictions-tab"):
                yield DataTable(id="eval-predictions", zebra_stripes=True)
        yield JobPanel("eval", idle="")
        yield Footer()

    def on_mount(self) -> None:
        self.show()
        job = jobs.attach(self.run_dir)
        if job is not None and job.stage == "eval" and job.running():
            self.query_one(JobPanel).follow(job)

    def show(self) -> None:
        folder = self.run_dir / "eval"
        comparison = read_json_object(folder / "comparison.json")
        table = self.query_one("#eval-table", DataTable)
        table.clear(columns=True)
        if not comparison:
            self.query_one("#eval-sentences", Static).update("No evaluation yet: press Evaluate (ctrl+s).")
            return
        primary = comparison.get("primary", "score")
        with_f1 = comparison.get("task") == "classification"
        table.add_columns("target", f"{primary} (95% CI)", *(["macro F1"] if with_f1 else []), "size", "tokens/s")
        self.reports = {}
        for row in comparison.get("targets", []):
            name = row["target"]
            self.reports[name] = read_json_object(folder / f"{name.replace(':', '-')}.json")
            size = f"{row['size_bytes'] / 2**20:,.0f} MiB" if row.get("size_bytes") else ""
            f1 = [interval(row.get("macro_f1"))] if with_f1 else []
            table.add_row(name, interval(row.get("score")), *f1, size, f"{row.get('tokens_per_s') or 0:.0f}", key=name)
        lines = [escape(c["sentence"]) for c in comparison.get("comparisons", [])]
        recommendation = comparison.get("recommendation")
        if recommendation:
            lines.append(f"[b]Recommended:[/b] {escape(recommendation['target'])}, "
                         f"{recommendation['size_bytes'] / 2**20:,.0f} MiB: {escape(recommendation['reason'])}")
        elif comparison.get("note"):
            lines.append(escape(comparison["note"]))
        self.query_one("#eval-sentences", Static).update("\n".join(lines))
        self._predictions()
        first = next(iter(self.reports), None)
        if first:
            self._confusion(first)

    @on(DataTable.RowHighlighted, "#eval-table")
    def _highlighted(self, message: DataTable.RowHighlighted) -> None:
        if message.row_key.value:
            self._confusion(str(message.row_key.value))

    def _confusion(self, target: str) -> None:
        report = (self.reports.get(target) or {}).get("report") or {}
        table = self.query_one("#eval-confusion", DataTable)
        table.clear(columns=True)
        matrix, labels = report.get("confusion"), report.get("labels")
        if not matrix or not labels:
            return
        columns = report.get("confusion_columns") or labels
        table.add_columns(f"{target}: true \\ predicted", *columns)
        for label, row in zip(labels, matrix, strict=False):
            cells = [Text(str(n), style="bold green" if c == label and n else ("red" if n else "dim"))
                     for c, n in zip(columns, row, strict=False)]
            table.add_row(label, *cells)

    def _predictions(self) -> None:
        table = self.query_one("#eval-predictions", DataTable)
        table.clear(columns=True)
        names = [n for n, r in self.reports.items() if r.get("predictions")]
        if not names:
            return
        references = [s.get("reference") for s in self.reports[names[0]].get("samples", [])]
        table.add_columns("#", "reference", *names)
        for i in range(len(self.reports[names[0]]["predictions"])):
            reference = references[i] if i < len(references) else None
            cells = []
            for name in names:
                predictions = self.reports[name]["predictions"]
                answer = str(predictions[i]) if i < len(predictions) else ""
                style = "" if reference is None else ("green" if answer == reference else "red")
                cells.append(Text(answer[:60], style=style))
            table.add_row(str(i + 1), Text(str(reference or "")[:60]), *cells)

    @on(Button.Pressed, "#eval-start")
    def action_start(self) -> None:
        panel = self.query_one(JobPanel)
        if panel.running:
            self.notify("The evaluation is running.", severity="warning")
            return
        store = self.app.store  # type: ignore[attr-defined]
        cfg = EvalConfig(store=str(store.root))
        job = self.start_job("eval", cfg, record=cfg.model_dump(mode="json"))
        if job is not None:
            panel.follow(job)

    @on(JobEnded)
    def _ended(self, message: JobEnded) -> None:
        if message.done is not None:
            self.query_one(JobPanel).say("[green]done[/]")
            self.show()

