"""New run: pick data files, see what they are (type, convention, columns), map the columns for the
task, choose the base model, and every other setting of the data stage (PII, bad rows, split, an
extraction schema, a template file, ...) as a form made from its config; then prepare them as a job.

The files are inspected as soon as the path is typed (first rows only, in a worker), and the task
and columns start from what the inspection suggests. A failed preparation lists every problem
(file:line, field, reason) in a table, and trying again reuses the same run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.timer import Timer
from textual.widgets import Button, DataTable, Input, Label, Select, Static

from appliance import jobs
from appliance.config import DataConfig
from appliance.errors import ApplianceError
from appliance.records import Problem
from appliance.run import Run
from tui.follow import JobEnded
from tui.screens.base import AppModal
from tui.widgets.form import ConfigForm
from tui.widgets.job_panel import JobPanel

TASKS = [("classification: answer with one label", "classification"), ("chat: free answers", "chat"),
         ("extraction: answer with JSON", "extraction")]
COLUMNS = {"text_field": ("text column", ("classification", "extraction")),
           "label_field": ("label column", ("classification",)),
           "output_field": ("JSON column", ("extraction",))}
OWN = ("inputs", "task", "model", *COLUMNS, "store")  # the settings this screen asks for itself
LABELS = {"pii": "PII", "on_error": "bad rows", "near_dup": "near-duplicates", "schema_path": "schema file",
          "template_path": "template file", "pii_recognizers": "own PII rules", "pii_scope": "PII numbering",
          "pii_entities": "PII entities", "pii_languages": "PII languages"}


class NewRunScreen(AppModal[str | None]):
    """Dismissed with the new run's id once its data is prepared, or None."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel"),
                                              Binding("ctrl+s", "prepare", "Prepare", priority=True)]

    def __init__(self, path: str = "") -> None:
        super().__init__()
        self.initial_path = path
        self.run: Run | None = None  # made on the first try, reused by the next
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
                yield Static("choose a base model: its memory and disk plan shows here", id="nr-plan")
                with Horizontal(classes="field"):
                    yield Label("run name", classes="field-label")
                    yield Input(id="nr-name", placeholder="optional: a name of your own (default: by the time)")
                yield ConfigForm(DataConfig, exclude=OWN, labels=LABELS, id="nr-settings")
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
        default = self.store.catalog_entry("default")
        return [(m.name + ("  (default)" if default and m.name == default.name else ""), m.name)
                for m in self.store.list_models()]

    def on_show(self) -> None:
        select: Select[str] = self.query_one("#nr-model", Select)
        if select.is_blank():
            default = self.store.catalog_entry("default")
            names = [m.name for m in self.store.list_models()]
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
            select: Select[str] = self.query_one(f"#nr-{name}", Select)
            select.set_options([(n, n) for n in names])
            wanted = getattr(suggestion, name, None)
            if isinstance(wanted, str) and wanted in names:
                select.value = wanted
        if infos and not any(i.error for i in infos):
            self.query_one("#nr-task", Select).value = suggestion.task
        self._show_columns()

    @on(Select.Changed, "#nr-task")
    def _show_columns(self) -> None:
        task = self.query_one("#nr-task", Select).value
        for name, (_label, tasks) in COLUMNS.items():
            self.query_one(f"#nr-row-{name}", Horizontal).display = task in tasks

    @on(Select.Changed, "#nr-model")
    def _model_changed(self, message: Select.Changed) -> None:
        if isinstance(message.value, str):
            self._plan(message.value)

    @work(thread=True, exclusive=True, group="plan", exit_on_error=False)
    def _plan(self, name: str) -> None:
        """The whole pipeline's needs for the chosen base model against this machine (`appliance plan`)."""
        from appliance import pipeline_plan as pp

        config = pp.read_config(self.store.model_dir(name) / "config.json")
        plan = pp.pipeline(config, name, pp.Choices(import_kind="imported"), pp.Machine.here(self.store.root))
        peak = max(plan.stages, key=lambda s: max(s.ram_mb, s.vram_mb))
        refusals = plan.refusals()
        verdict = "[green]fits this machine[/]" if not refusals else f"[red]does not fit:[/] {escape(refusals[0])}"
        text = (f"pipeline plan: at most {pp.gib(max(peak.ram_mb, peak.vram_mb))} of memory ({peak.stage}), "
                f"{pp.gb(plan.disk_mb)} of disk; {pp.gib(plan.machine.ram_available_mb)} available, "
                f"{pp.gb(plan.machine.disk_free_mb)} free: {verdict} (appliance plan --base-model {name})")
        self.app.call_from_thread(self.query_one("#nr-plan", Static).update, text)

    # -- preparing ---------------------------------------------------------------------------

    @on(Button.Pressed, "#nr-cancel")
    def action_cancel(self) -> None:
        if self.query_one(JobPanel).running:
            self.notify("Preparing: wait for it to finish.", severity="warning")
            return
        self.dismiss(None)

    def config(self) -> DataConfig | None:
        paths = [p.strip() for p in self.query_one("#nr-path", Input).value.split(",") if p.strip()]
        task = self.query_one("#nr-task", Select).value
        own: dict[str, Any] = {"inputs": paths, "task": task, "store": str(self.store.root)}
        for name, (label, tasks) in COLUMNS.items():
            select: Select[str] = self.query_one(f"#nr-{name}", Select)
            if task in tasks:
                if select.is_blank():
                    self._error(f"choose the {label}")
                    return None
                own[name] = select.value
        model: Select[str] = self.query_one("#nr-model", Select)
        own["model"] = None if model.is_blank() else model.value
        try:
            cfg: DataConfig = self.query_one("#nr-settings", ConfigForm).validate_with(own)
        except ApplianceError as exc:
            self._error(exc.message)
            return None
        return cfg

    def _error(self, text: str) -> None:
        self.query_one("#nr-status", Static).update(f"[red]{escape(text)}[/]")

    @on(Button.Pressed, "#nr-start")
    def action_prepare(self) -> None:
        if self.query_one(JobPanel).running:
            return
        cfg = self.config()
        if cfg is None:
            return
        missing = [p for p in cfg.inputs if not Path(p).expanduser().is_file()]
        if missing:
            self._error(f"not found: {', '.join(missing)}")
            return
        name = self.query_one("#nr-name", Input).value.strip() or None
        try:
            if self.run is None or (name is not None and name != self.run.id):
                self.run = self.store.run_or_new(name)
            job = jobs.start("data", self.run.path, cfg)
        except ApplianceError as exc:
            self._error(f"{exc.title}: {exc.message}")
            return
        self.query_one("#nr-problems", DataTable).display = False
        self.query_one("#nr-start", Button).disabled = True
        self.query_one("#nr-status", Static).update(f"preparing into {self.run.id}…")
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
        if self.run is not None and self.run.failed_problems_path.is_file():
            self._list_problems(self.run.failed_problems_path)

    def _list_problems(self, listing: Path) -> None:
        table: DataTable[str] = self.query_one("#nr-problems", DataTable)
        table.clear()
        with open(listing, encoding="utf-8") as handle:
            for number, line in enumerate(handle):
                if number >= 1000:
                    break
                problem = Problem.model_validate_json(line)
                table.add_row(f"{Path(problem.file).name}:{problem.line}", problem.field, problem.reason)
        table.display = True
        table.focus()
