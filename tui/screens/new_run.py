"""New run: point at data files, say what the model should learn, and prepare them as a job."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Input, Label, ProgressBar, Select, Static

from appliance import events as ev
from appliance import jobs
from appliance.config import DataConfig
from tui.follow import JobEnded, JobEvent, follow

TASKS = [("classification: answer with one label", "classification"), ("chat: free answers", "chat"),
         ("extraction: answer with JSON", "extraction")]


class NewRunScreen(ModalScreen[str | None]):
    """Dismissed with the new run's id once its data is prepared, or None."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, path: str = "") -> None:
        super().__init__()
        self.initial_path = path
        self.job: jobs.Job | None = None

    def compose(self) -> ComposeResult:
        with Vertical(id="new-run"):
            yield Static("[b]New run[/b]: prepare your data (validated, PII redacted, deduplicated, split)")
            with Horizontal(classes="field"):
                yield Label("data files", classes="field-label")
                yield Input(self.initial_path, id="nr-path", placeholder="path(s), comma-separated: .jsonl .csv …")
            with Horizontal(classes="field"):
                yield Label("task", classes="field-label")
                yield Select(TASKS, value="classification", allow_blank=False, id="nr-task")
            with Horizontal(classes="field"):
                yield Label("label column", classes="field-label")
                yield Input("label", id="nr-label")
            with Horizontal(classes="field"):
                yield Label("text column", classes="field-label")
                yield Input("text", id="nr-text")
            with Horizontal(classes="field"):
                yield Label("near-duplicates", classes="field-label")
                yield Checkbox("remove (sentence embeddings; slower on large files)", True, id="nr-near-dup",
                               compact=True)
            yield Static("", id="nr-status")
            bar = ProgressBar(id="nr-progress", show_eta=False)
            bar.display = False  # until the job runs
            yield bar
            with Horizontal(id="nr-buttons"):
                yield Button("Prepare", id="nr-start", variant="primary")
                yield Button("Cancel", id="nr-cancel")

    @on(Button.Pressed, "#nr-cancel")
    def action_cancel(self) -> None:
        if self.job is not None and self.job.running():
            self.notify("Preparing: wait for it to finish.", severity="warning")
            return
        self.dismiss(None)

    @on(Button.Pressed, "#nr-start")
    def start(self) -> None:
        from pydantic import ValidationError

        store = self.app.store  # type: ignore[attr-defined]
        paths = [p.strip() for p in self.query_one("#nr-path", Input).value.split(",") if p.strip()]
        try:
            cfg = DataConfig(inputs=paths, task=self.query_one("#nr-task", Select).value,
                             label_field=self.query_one("#nr-label", Input).value.strip() or "label",
                             text_field=self.query_one("#nr-text", Input).value.strip() or "text",
                             near_dup=self.query_one("#nr-near-dup", Checkbox).value,
                             store=str(store.root))
        except ValidationError as exc:
            self.query_one("#nr-status", Static).update(
                "[red]" + escape("; ".join(f"{e['loc'][0]}: {e['msg']}" for e in exc.errors())) + "[/]")
            return
        missing = [p for p in paths if not Path(p).exists()]
        if missing:
            self.query_one("#nr-status", Static).update(f"[red]not found: {escape(', '.join(missing))}[/]")
            return
        run_dir = store.new_run_dir()
        store.record_config(run_dir, "data", cfg.model_dump(mode="json"))
        self.job = jobs.start("data", run_dir, cfg)
        self.query_one("#nr-progress", ProgressBar).display = True
        self.query_one("#nr-start", Button).disabled = True
        self.query_one("#nr-status", Static).update(f"preparing into {run_dir.name}…")
        self._follow(self.job)

    @work(thread=True, exclusive=True, group="new-run", exit_on_error=False)
    def _follow(self, job: jobs.Job) -> None:
        follow(job, self)

    @on(JobEvent)
    def _event(self, message: JobEvent) -> None:
        event = message.event
        if isinstance(event, ev.Progress):
            self.query_one("#nr-progress", ProgressBar).update(total=event.total, progress=event.step)
            self.query_one("#nr-status", Static).update(escape(event.phase))

    @on(JobEnded)
    def _ended(self, message: JobEnded) -> None:
        if message.done is not None:
            self.dismiss(message.job.dir.name)
            return
        error = message.error
        assert error is not None
        self.query_one("#nr-status", Static).update(f"[red]{escape(error.title)}: {escape(error.message)}[/]\n"
                                                    f"{escape(error.hint)}")
        self.query_one("#nr-start", Button).disabled = False
