"""Data: what the data stage made of a run's files, from `data/data_report.json`.

Tabs: a summary (where every row went, the label balance of each split), the problems as a
navigable table (file:line, field, reason), PII found with rows before (masked) and after, exact
and near duplicates and the evaluation rows moved to training (contamination), and a histogram of
templated lengths with what they mean for padding and packing.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from typing import Any, ClassVar

from rich.markup import escape
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.widgets import DataTable, Footer, Header, Static, TabbedContent, TabPane
from textual_plotext import PlotextPlot

from appliance.errors import StoreError
from appliance.fsutil import read_json_object
from tui.screens.run import RunScreen

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
        yield Footer()

    def on_mount(self) -> None:
        report = read_json_object(self.run_dir / "data" / "data_report.json")
        if not report or "counts" not in report:
            self.query_one("#data-title", Static).update(
                f"[b]Data[/b] {self.run_id}: [yellow]no prepared data yet[/] (press n on Home for a new run)")
            return
        try:
            config = self.app.store.stage_config(self.run_dir, "data")  # type: ignore[attr-defined]
        except StoreError:
            config = {}  # the report is what this screen shows; the settings only label it
        formats = ", ".join(f"{escape(Path(f).name)} ({fmt})" for f, fmt in (report.get("formats") or {}).items())
        self.query_one("#data-title", Static).update(
            f"[b]Data[/b] {self.run_id} · task {escape(str(config.get('task', '?')))} · base model "
            f"{escape(str(config.get('model') or 'the default'))} · PII {report['pii'].get('mode')} · from "
            f"{formats or 'no readable file'}")
        self._summary(report)
        self._problems(report)
        self._pii(report["pii"])
        self._duplicates(report)
        self._lengths(report.get("lengths"))

    def _summary(self, report: dict[str, Any]) -> None:
        counts = self.query_one("#data-counts", DataTable)
        counts.add_columns("rows", "count")
        for key, label in COUNTS.items():
            if key in report["counts"]:
                counts.add_row(label, f"{report['counts'][key]:,}")
        labels = self.query_one("#data-labels", DataTable)
        distribution = (report.get("labels") or {}).get("distribution")
        if not distribution:
            labels.display = False
            return
        splits = list(distribution)
        labels.add_columns("label", *splits)
        for label in (report.get("labels") or {}).get("set") or []:
            labels.add_row(label, *(str(distribution[s].get(label, 0)) for s in splits))

    def _problems(self, report: dict[str, Any]) -> None:
        table = self.query_one("#data-problems", DataTable)
        table.add_columns("file:line", "field", "reason")
        problems = report.get("problems") or []
        for problem in problems:
            table.add_row(f"{Path(problem['file']).name}:{problem['line']}", problem.get("field") or "",
                          problem["reason"])
        total = report["counts"].get("invalid", 0)
        note = "no problems: every row was usable" if not problems else \
            f"{total} row(s) left out (--on-error skip); each is listed with its file, line and field"
        if total > len(problems):
            note += f"; the first {len(problems)} here, all in {self.run_dir / 'data' / 'problems.jsonl'}"
        self.query_one("#data-problems-note", Static).update(escape(note))

    def _pii(self, pii: dict[str, Any]) -> None:
        counts = pii.get("counts") or {}
        mode = pii.get("mode")
        effect = {"redact": "replaced by typed placeholders", "report": "kept (report only)",
                  "drop": "rows with any of it dropped"}.get(str(mode), "")
        self.query_one("#data-pii-note", Static).update(
            f"{pii.get('rows_with_pii', 0)} row(s) with PII or secrets, {effect}. Values are masked here."
            if counts else "no PII or secrets found")
        table = self.query_one("#data-pii", DataTable)
        table.add_columns("type", "found", "masked samples")
        for kind, count in counts.items():
            table.add_row(kind, str(count), ", ".join((pii.get("masked_samples") or {}).get(kind, [])))
        previews = pii.get("previews") or []
        self.query_one("#data-pii-preview", Static).update("\n".join(
            [f"[b]Before and after[/b] ({len(previews)} rows)"] if previews else []) + "".join(
            f"\n[b]{escape(Path(row['source']).name)}[/b] {escape(row['role'])} · {escape(', '.join(row['types']))}\n"
            f"  [red]-[/] {escape(row['before'])}\n  [green]+[/] {escape(row['after'])}" for row in previews))

    def _duplicates(self, report: dict[str, Any]) -> None:
        table = self.query_one("#data-dups", DataTable)
        table.add_columns("kind", "row", "same as", "cosine")
        duplicates = report.get("duplicates") or {}
        for item in duplicates.get("exact") or []:
            table.add_row("exact", Path(item["source"]).name, Path(item["duplicate_of"]).name, "")
        for item in duplicates.get("near") or []:
            table.add_row("near", Path(item["source"]).name, Path(item["duplicate_of"]).name, f"{item['cosine']:.3f}")
        contamination = report.get("contamination") or {}
        for item in contamination.get("rows") or []:
            table.add_row("in val/test, moved to train", Path(item["source"]).name, "a training row",
                          f"{item['cosine']:.3f}")
        counts = report["counts"]
        near = duplicates.get("near_threshold")
        note = (f"{counts.get('duplicates_exact', 0)} exact and {counts.get('duplicates_near', 0)} near-duplicate "
                f"row(s) removed" + (f" (cosine ≥ {near})" if near else " (near-duplicates not checked)"))
        if contamination.get("checked"):
            note += (f"; {counts.get('moved_to_train', 0)} validation/test row(s) nearly repeated a training row "
                     f"(cosine ≥ {contamination.get('threshold')}) and moved to train")
        self.query_one("#data-dups-note", Static).update(escape(note))

    def _lengths(self, lengths: dict[str, Any] | None) -> None:
        note = self.query_one("#data-lengths-note", Static)
        plot = self.query_one("#data-histogram", PlotextPlot)
        if not lengths or not lengths.get("rows"):
            note.update("lengths were not measured (prepared without templating)")
            plot.display = False
            return
        note.update(
            f"tokens per templated row: median {lengths['p50']}, p95 {lengths['p95']}, max {lengths['max']}; "
            f"{lengths['truncated']} over the limit of {lengths['max_seq_len']}. Batches of 4 padded to their "
            f"longest use {lengths['padding_efficiency']:.0%} of their tokens; packed, "
            f"{lengths['packing_efficiency']:.0%}.")
        fine = lengths.get("bins") or {"edges": [0, 1], "counts": [0]}
        names = [f"{lo}-{hi - 1}" if hi - lo > 1 else str(lo) for lo, hi in pairwise(fine["edges"])]
        counts = fine["counts"]
        plt = plot.plt
        plt.clear_data()
        plt.title("rows by templated length (tokens)")
        plt.bar(names, counts)
        plot.refresh()
