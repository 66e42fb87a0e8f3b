"""New run: pick data files, see what they are (type, convention, columns), map the columns for the
task, choose the base model and how PII and bad rows are handled, and prepare them as a job.

The files are inspected as soon as the path is typed (first rows only, in a worker), and the task
and columns start from what the inspection suggests. A failed preparation lists every problem
(file:line, field, reason) in a table, and trying again reuses the same run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.timer import Timer
from textual.widgets import Button, Checkbox, DataTable, Input, Label, Select, Static

from appliance.config import DataConfig
from appliance.errors import ApplianceError
from tui.follow import JobEnded
from tui.widgets.job_panel import JobPanel

TASKS = [("classification: answer with one label", "classification"), ("chat: free answers", "chat"),
         ("extraction: answer with JSON", "extraction")]
PII = [("redact: typed placeholders", "redact"), ("report: keep, only count", "report"),
       ("drop: leave rows with PII out", "drop")]
ON_ERROR = [("fail: list every bad row and stop", "fail"), ("skip: leave bad rows out, listed", "skip")]
COLUMNS = {"text_field": ("text column", ("classification", "extraction")),
           "label_field": ("label column", ("classification",)),
           "output_field": ("JSON column", ("extraction",))}


class NewRunScreen(ModalScreen[str | None]):
    """Dismissed with the new run's id once its data is prepared, or None."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel"),
                                              Binding("ctrl+s", "prepare", "Prepare", priority=True)]

    def __init__(self, path: str = "") -> None:
        super().__init__()
        self.initial_path = path
        self.run_dir: Path | None = None  # made on the first try, reused by the next
        self.inspected: list[Any] = []
        self._debounce: Timer | None = None

    def compose(self) -> ComposeResult:
        with Vertical(id="new-run"):
            yield Static("[b]New run[/b]: prepare your data (validated, PII handled, deduplicated, split)")
            with VerticalScroll(id="nr-form"):
                with Horizontal(classes="field"):
                    yield Label("data files", classes="field-label")
                    yield Input(self.initial_path, id="nr-path", placeholder="path(s), comma-separated: .jsonl "
                                ".csv .tsv .json .parquet")
                yield Static("type a path: each file is inspected as you go", id="nr-files")
                with Horizontal(classes="field"):
                    yield Label("task", classes="field-label")
                    yield Select(TASKS, value="classification", allow_blank=False, id="nr-task")
                for name, (label, _tasks) in COLUMNS.items():
                    with Horizontal(classes="field", id=f"nr-row-{name}"):
                        yield Label(label, classes="field-label")
                        yield Select[str]([], id=f"nr-{name}", prompt="(inspect files first)")
                with Horizontal(classes="field"):
                    yield Label("base model", classes="field-label")
                    yield Select[str](self._models(), id="nr-model", prompt="(none: import one in Models)")
                with Horizontal(classes="field"):
                    yield Label("PII", classes="field-label")
                    yield Select(PII, value="redact", allow_blank=False, id="nr-pii")
                with Horizontal(classes="field"):
                    yield Label("bad rows", classes="field-label")
                    yield Select(ON_ERROR, value="fail", allow_blank=False, id="nr-on-error")
                with Horizontal(classes="field"):
                    yield Label("near-duplicates", classes="field-label")
                    yield Checkbox("remove (sentence embeddings; slower on large files)", True, id="nr-near-dup",
                                   compact=True)
                with Horizontal(classes="field"):
                    yield Label("split", classes="field-label")
                    yield Input("80/10/10", id="nr-split", placeholder="train/val/test percent")
            yield Static("", id="nr-status")
            yield JobPanel("nr", idle="")
            problems: DataTable[str] = DataTable(id="nr-problems", cursor_type="row", zebra_stripes=True)
            problems.display = False  # until a preparation fails on rows
            yield problems
            with Horizontal(id="nr-buttons"):
                yield Button("Prepare", id="nr-start", variant="primary")
                yield Button("Cancel", id="nr-cancel")

    def on_mount(self) -> None:
        self.query_one("#nr-problems", DataTable).add_columns("file:line", "field", "reason")
        self._show_columns()
        self.query_one("#nr-path", Input).focus()
        if self.initial_path:
            self._inspect(self.initial_path)

    def _models(self) -> list[tuple[str, str]]:
        store = self.app.store  # type: ignore[attr-defined]
        default = store.catalog_entry("default")
        return [(m.name + ("  (default)" if default and m.name == default.name else ""), m.name)
                for m in store.list_models()]

    def on_show(self) -> None:
        select = self.query_one("#nr-model", Select)
        if select.is_blank():
            store = self.app.store  # type: ignore[attr-defined]
            default = store.catalog_entry("default")
            names = [m.name for m in store.list_models()]
            if names:
                select.value = default.name if default and default.name in names else names[0]

    # -- inspection --------------------------------------------------------------------------

    @on(Input.Changed, "#nr-path")
    def _path_changed(self, message: Input.Changed) -> None:
        if self._debounce is not None:
            self._debounce.stop()
        self._debounce = self.set_timer(0.4, lambda: self._inspect(message.value))

    @work(thread=True, exclusive=True, group="inspect", exit_on_error=False)
    def _inspect(self, value: str) -> None:
        from appliance.data.inspect import inspect_file, suggest

        paths = [Path(p.strip()).expanduser() for p in value.split(",") if p.strip()]
        infos = [inspect_file(p) for p in paths]
        self.app.call_from_thread(self._inspected, infos, suggest(infos))

    def _inspected(self, infos: list[Any], suggestion: Any) -> None:
        self.inspected = infos
        lines = []
        for info in infos:
            name = escape(Path(info.path).name)
            if info.error:
                lines.append(f"[red]✗ {name}: {escape(info.error)}[/]")
                continue
            columns = ", ".join(c.name for c in info.columns) if info.convention == "table" else ""
            lines.append(f"[green]✓[/] {name}: {info.kind}, {info.convention}, {info.rows_sampled} rows looked at"
                         + (f", [yellow]{info.problems} unreadable[/]" if info.problems else "")
                         + (f" · columns: {escape(columns)}" if columns else ""))
        if infos and not any(i.error for i in infos):
            lines.append(f"suggested: [b]{suggestion.task}[/b] ({escape(suggestion.reason)})")
        self.query_one("#nr-files", Static).update("\n".join(lines) or "type a path: each file is inspected")
        names = list(dict.fromkeys(c.name for i in infos for c in i.columns))
        for name in COLUMNS:
            select = self.query_one(f"#nr-{name}", Select)
            select.set_options([(n, n) for n in names])
            wanted = getattr(suggestion, name, None)
            if wanted in names:
                select.value = wanted
        if infos and not any(i.error for i in infos):
            self.query_one("#nr-task", Select).value = suggestion.task
        self._show_columns()

    @on(Select.Changed, "#nr-task")
    def _show_columns(self) -> None:
        task = self.query_one("#nr-task", Select).value
        for name, (_label, tasks) in COLUMNS.items():
            self.query_one(f"#nr-row-{name}").display = task in tasks

    # -- preparing ---------------------------------------------------------------------------

    @on(Button.Pressed, "#nr-cancel")
    def action_cancel(self) -> None:
        if self.query_one(JobPanel).running:
            self.notify("Preparing: wait for it to finish.", severity="warning")
            return
        self.dismiss(None)

    def config(self) -> DataConfig | None:
        from pydantic import ValidationError

        store = self.app.store  # type: ignore[attr-defined]
        paths = [p.strip() for p in self.query_one("#nr-path", Input).value.split(",") if p.strip()]
        options: dict[str, Any] = {}
        task = self.query_one("#nr-task", Select).value
        for name, (label, tasks) in COLUMNS.items():
            select = self.query_one(f"#nr-{name}", Select)
            if task in tasks:
                if select.is_blank():
                    self._error(f"choose the {label}")
                    return None
                options[name] = select.value
        model = self.query_one("#nr-model", Select)
        try:
            split = tuple(float(v) / 100 for v in self.query_one("#nr-split", Input).value.split("/"))
        except ValueError:
            split = ()
        try:
            return DataConfig(inputs=paths, task=task, pii=self.query_one("#nr-pii", Select).value,
                              on_error=self.query_one("#nr-on-error", Select).value,
                              near_dup=self.query_one("#nr-near-dup", Checkbox).value,
                              model=None if model.is_blank() else model.value, split=split,
                              store=str(store.root), **options)
        except ValidationError as exc:
            self._error("; ".join(f"{e['loc'][0] if e['loc'] else 'settings'}: {e['msg']}" for e in exc.errors()))
            return None

    def _error(self, text: str) -> None:
        self.query_one("#nr-status", Static).update(f"[red]{escape(text)}[/]")

    @on(Button.Pressed, "#nr-start")
    def action_prepare(self) -> None:
        from appliance import jobs

        if self.query_one(JobPanel).running:
            return
        cfg = self.config()
        if cfg is None:
            return
        missing = [p for p in cfg.inputs if not Path(p).expanduser().is_file()]
        if missing:
            self._error(f"not found: {', '.join(missing)}")
            return
        store = self.app.store  # type: ignore[attr-defined]
        if self.run_dir is None:
            self.run_dir = store.new_run_dir()
        try:
            job = jobs.start("data", self.run_dir, cfg, record=cfg.model_dump(mode="json"))
        except ApplianceError as exc:
            self._error(f"{exc.title}: {exc.message}")
            return
        self.query_one("#nr-problems", DataTable).display = False
        self.query_one("#nr-start", Button).disabled = True
        self.query_one("#nr-status", Static).update(f"preparing into {self.run_dir.name}…")
        self.query_one(JobPanel).follow(job)

    @on(JobEnded)
    def _ended(self, message: JobEnded) -> None:
        self.query_one("#nr-start", Button).disabled = False
        if message.done is not None:
            self.dismiss(message.job.dir.name)
            return
        error = message.error
        assert error is not None
        self.query_one("#nr-status", Static).update(f"[red]{escape(error.title)}[/]: {escape(error.hint)}")
        listing = message.job.dir / "data_problems.jsonl"
        if listing.is_file():
            self._list_problems(listing)

    def _list_problems(self, listing: Path) -> None:
        table = self.query_one("#nr-problems", DataTable)
        table.clear()
        with open(listing, encoding="utf-8") as handle:
            for number, line in enumerate(handle):
                if number >= 1000:
                    break
                problem = json.loads(line)
                where = f"{Path(problem['file']).name}:{problem['line']}"
                table.add_row(where, problem.get("field") or "", problem["reason"])
        table.display = True
        table.focus()
