"""Evaluate: every target side by side with 95% intervals, the paired comparisons, the recommended
quantization, the confusion matrix of the target under the cursor and the predictions item by item."""

from __future__ import annotations

from typing import ClassVar

from rich.markup import escape
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, DataTable, Footer, Header, Static, TabbedContent, TabPane

from appliance.config import EvalConfig
from appliance.errors import ApplianceError
from appliance.records import Interval, TargetResult
from tui.follow import JobEnded
from tui.screens.base import RunScreen
from tui.widgets.job_panel import JobPanel


def interval(score: Interval | None) -> str:
    if score is None:
        return ""
    return f"{score.point * 100:.1f} [{score.low * 100:.1f}, {score.high * 100:.1f}]"


class EvaluateScreen(RunScreen):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+s", "start", "Evaluate"),
        Binding("escape", "app.pop_screen", "Back", priority=True),
    ]

    def __init__(self, run_id: str) -> None:
        super().__init__(run_id)
        self.reports: dict[str, TargetResult] = {}

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
        self.last_job("eval")

    def show(self) -> None:
        table: DataTable[str | Text] = self.query_one("#eval-table", DataTable)
        table.clear(columns=True)
        sentences = self.query_one("#eval-sentences", Static)
        try:
            comparison = self.run.comparison()
            self.reports = {row.target: report for row in comparison.targets
                            if (report := self.run.evaluation(row.target)) is not None} if comparison else {}
        except ApplianceError as exc:
            sentences.update(f"[red]{escape(exc.message)}[/]\n{escape(exc.hint)}")
            return
        if comparison is None:
            sentences.update("No evaluation yet: press Evaluate (ctrl+s).")
            return
        with_f1 = comparison.task == "classification"
        table.add_columns("target", f"{comparison.primary} (95% CI)", *(["macro F1"] if with_f1 else []), "size",
                          "tokens/s")
        for row in comparison.targets:
            size = f"{row.size_bytes / 2**20:,.0f} MiB" if row.size_bytes else ""
            f1 = [interval(row.macro_f1)] if with_f1 else []
            table.add_row(row.target, interval(row.score), *f1, size, f"{row.tokens_per_s:.0f}", key=row.target)
        lines = [escape(c.sentence) for c in comparison.comparisons]
        recommendation = comparison.recommendation
        if recommendation:
            lines.append(f"[b]Recommended:[/b] {escape(recommendation.target)}, "
                         f"{recommendation.size_bytes / 2**20:,.0f} MiB: {escape(recommendation.reason)}")
        elif comparison.note:
            lines.append(escape(comparison.note))
        sentences.update("\n".join(lines))
        self._predictions()
        first = next(iter(self.reports), None)
        if first:
            self._confusion(first)

    @on(DataTable.RowHighlighted, "#eval-table")
    def _highlighted(self, message: DataTable.RowHighlighted) -> None:
        if message.row_key.value:
            self._confusion(str(message.row_key.value))

    def _confusion(self, target: str) -> None:
        report = self.reports.get(target)
        table: DataTable[str | Text] = self.query_one("#eval-confusion", DataTable)
        table.clear(columns=True)
        found = report.confusion() if report is not None else None
        if found is None:
            return
        labels, columns, matrix = found
        table.add_columns(f"{target}: true \\ predicted", *columns)
        for label, row in zip(labels, matrix, strict=False):
            cells = [Text(str(n), style="bold green" if c == label and n else ("red" if n else "dim"))
                     for c, n in zip(columns, row, strict=False)]
            table.add_row(label, *cells)

    def _predictions(self) -> None:
        table: DataTable[str | Text] = self.query_one("#eval-predictions", DataTable)
        table.clear(columns=True)
        names = [n for n, r in self.reports.items() if r.predictions]
        if not names:
            return
        references = [s.get("reference") for s in self.reports[names[0]].samples]
        table.add_columns("#", "reference", *names)
        for i in range(len(self.reports[names[0]].predictions)):
            reference = references[i] if i < len(references) else None
            cells = []
            for name in names:
                predictions = self.reports[name].predictions
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
        job = self.start_job("eval", EvalConfig(store=str(self.store.root)))
        if job is not None:
            panel.follow(job)

    @on(JobEnded)
    def _ended(self, message: JobEnded) -> None:
        if message.done is not None:
            self.query_one(JobPanel).say("[green]done[/]")
            self.show()
