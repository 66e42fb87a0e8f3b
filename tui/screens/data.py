"""Data: what the data stage made of a run's files (its data report), and its last data job.

Tabs: a summary (where every row went, the label balance of each split), the problems as a
navigable table (file:line, field, reason), PII found with rows before (masked) and after, exact
and near duplicates and the evaluation rows moved to training (contamination), and a histogram of
templated lengths with what they mean for padding and packing.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from typing import ClassVar

from rich.markup import escape
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.widgets import DataTable, Footer, Header, Static, TabbedContent, TabPane
from textual_plotext import PlotextPlot

from appliance.errors import ApplianceError
from appliance.records import Bins, DataReport, Lengths, PiiReport
from appliance.run import PROBLEMS
from tui.screens.base import RunScreen
from tui.widgets.job_panel import JobPanel

COUNTS = {"rows_read": "rows read", "invalid": "invalid (see Problems)", "pii_dropped": "dropped for PII",
          "duplicates_exact": "exact duplicates", "duplicates_near": "near-duplicates", "train": "train",
          "val": "validation", "test": "test", "moved_to_train": "of which moved to train (contamination)"}


class DataScreen(RunScreen):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "app.pop_screen", "Back", priority=True)]

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(f"[b]Data[/b] {self.run_id}", id="data-title")
        with TabbedContent(id="data-tabs"):
            with TabPane("Summary", id="tab-summary"):
                yield DataTable(id="data-counts", cursor_type="row", zebra_stripes=True)
                yield DataTable(id="data-labels", cursor_type="row", zebra_stripes=True)
            with TabPane("Problems", id="tab-problems"):
                yield Static("", id="data-problems-note")
                yield DataTable(id="data-problems", cursor_type="row", zebra_stripes=True)
            with TabPane("PII", id="tab-pii"), VerticalScroll():
                yield Static("", id="data-pii-note")
                yield DataTable(id="data-pii", cursor_type="row", zebra_stripes=True)
                yield Static("", id="data-pii-preview")
            with TabPane("Duplicates", id="tab-duplicates"):
                yield Static("", id="data-dups-note")
                yield DataTable(id="data-dups", cursor_type="row", zebra_stripes=True)
            with TabPane("Lengths", id="tab-lengths"), Vertical():
                yield Static("", id="data-lengths-note")
                yield PlotextPlot(id="data-histogram")
        yield JobPanel("data", idle="")
        yield Footer()

    def on_mount(self) -> None:
        self.last_job("data")  # a preparation that failed or still runs says so below the report
        title = self.query_one("#data-title", Static)
        try:
            report = self.run.data_report()
        except ApplianceError as exc:
            title.update(f"[b]Data[/b] {self.run_id}: [red]{escape(exc.message)}[/]")
            return
        if report is None:
            title.update(f"[b]Data[/b] {self.run_id}: [yellow]no prepared data yet[/] (press n on Home for a new run)")
            return
        formats = ", ".join(f"{escape(Path(f).name)} ({fmt})" for f, fmt in report.formats.items())
        model = report.model or (report.config.model if report.config is not None else None)
        title.update(f"[b]Data[/b] {self.run_id} · task {escape(report.task)} · base model "
                     f"{escape(model or 'the default')} · PII {report.pii.mode} · from {formats or 'no readable file'}")
        self._summary(report)
        self._problems(report)
        self._pii(report.pii)
        self._duplicates(report)
        self._lengths(report.lengths)

    def _summary(self, report: DataReport) -> None:
        counts: DataTable[str] = self.query_one("#data-counts", DataTable)
        counts.add_columns("rows", "count")
        values = report.counts.model_dump()
        for key, label in COUNTS.items():
            counts.add_row(label, f"{values[key]:,}")
        labels: DataTable[str] = self.query_one("#data-labels", DataTable)
        if report.labels is None or not report.labels.distribution:
            labels.display = False
            return
        distribution = report.labels.distribution
        splits = list(distribution)
        labels.add_columns("label", *splits)
        for label in report.labels.set:
            labels.add_row(label, *(str(distribution[s].get(label, 0)) for s in splits))

    def _problems(self, report: DataReport) -> None:
        table: DataTable[str] = self.query_one("#data-problems", DataTable)
        table.add_columns("file:line", "field", "reason")
        for problem in report.problems:
            table.add_row(f"{Path(problem.file).name}:{problem.line}", problem.field, problem.reason)
        total = report.counts.invalid
        note = "no problems: every row was usable" if not report.problems else \
            f"{total} row(s) left out (--on-error skip); each is listed with its file, line and field"
        if total > len(report.problems):
            note += f"; the first {len(report.problems)} here, all in {self.run.data_dir / PROBLEMS}"
        self.query_one("#data-problems-note", Static).update(escape(note))

    def _pii(self, pii: PiiReport) -> None:
        effect = {"redact": "replaced by typed placeholders", "report": "kept (report only)",
                  "drop": "rows with any of it dropped"}.get(pii.mode, "")
        self.query_one("#data-pii-note", Static).update(
            f"{pii.rows_with_pii} row(s) with PII or secrets, {effect}. Values are masked here."
            if pii.counts else "no PII or secrets found")
        table: DataTable[str] = self.query_one("#data-pii", DataTable)
        table.add_columns("type", "found", "masked samples")
        for kind, count in pii.counts.items():
            table.add_row(kind, str(count), ", ".join(pii.masked_samples.get(kind, [])))
        previews = pii.previews
        self.query_one("#data-pii-preview", Static).update("\n".join(
            [f"[b]Before and after[/b] ({len(previews)} rows)"] if previews else []) + "".join(
            f"\n[b]{escape(Path(row.source).name)}[/b] {escape(row.role)} · {escape(', '.join(row.types))}\n"
            f"  [red]-[/] {escape(row.before)}\n  [green]+[/] {escape(row.after)}" for row in previews))

    def _duplicates(self, report: DataReport) -> None:
        table: DataTable[str] = self.query_one("#data-dups", DataTable)
        table.add_columns("kind", "row", "same as", "cosine")
        duplicates, contamination, counts = report.duplicates, report.contamination, report.counts
        for item in duplicates.exact:
            table.add_row("exact", Path(item.source).name, Path(item.duplicate_of).name, "")
        for item in duplicates.near:
            table.add_row("near", Path(item.source).name, Path(item.duplicate_of).name, f"{item.cosine:.3f}")
        for row in contamination.rows:
            table.add_row("in val/test, moved to train", Path(row.source).name, "a training row", f"{row.cosine:.3f}")
        near = duplicates.near_threshold
        note = (f"{counts.duplicates_exact} exact and {counts.duplicates_near} near-duplicate row(s) removed"
                + (f" (cosine ≥ {near})" if near else " (near-duplicates not checked)"))
        if contamination.checked:
            note += (f"; {counts.moved_to_train} validation/test row(s) nearly repeated a training row "
                     f"(cosine ≥ {contamination.threshold}) and moved to train")
        self.query_one("#data-dups-note", Static).update(escape(note))

    def _lengths(self, lengths: Lengths | None) -> None:
        note = self.query_one("#data-lengths-note", Static)
        plot = self.query_one("#data-histogram", PlotextPlot)
        if lengths is None or not lengths.rows:
            note.update("lengths were not measured (prepared without templating)")
            plot.display = False
            return
        note.update(
            f"tokens per templated row: median {lengths.p50}, p95 {lengths.p95}, max {lengths.max}; "
            f"{lengths.truncated} over the limit of {lengths.max_seq_len}. Batches of 4 padded to their "
            f"longest use {lengths.padding_efficiency:.0%} of their tokens; packed, "
            f"{lengths.packing_efficiency:.0%}.")
        fine = lengths.bins or Bins(edges=[0, 1], counts=[0])
        names = [f"{lo}-{hi - 1}" if hi - lo > 1 else str(lo) for lo, hi in pairwise(fine.edges)]
        plt = plot.plt
        plt.clear_data()
        plt.title("rows by templated length (tokens)")
        plt.bar(names, fine.counts)
        plot.refresh()
