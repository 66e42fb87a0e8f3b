"""Train: every training setting as a form (the same fields as `appliance train`, checked as you type,
with the memory planner's verdict), start / stop / resume, a sweep, and the job live: progress,
tokens/s, ETA, memory, the loss curves and the log. Opening a run shows its last training, running
(started by an earlier TUI or the CLI: the screen attaches to it) or finished, with its history."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Button, Checkbox, Footer, Header, Input, Select, Static
from textual_plotext import PlotextPlot

from appliance import events as ev
from appliance import hardware, jobs, planner
from appliance.config import TrainConfig, load_settings
from appliance.errors import ApplianceError
from appliance.records import TrainResult
from appliance.run import Run
from tui.follow import JobEnded, JobEvent
from tui.screens.base import RunScreen
from tui.widgets.form import ConfigForm
from tui.widgets.job_panel import JobPanel

RECIPE = Path(__file__).resolve().parents[2] / "appliance" / "train" / "recipes" / "smollm2-cpu.yaml"
HIDDEN = ("store", "resume")  # the screen's own: the store it runs in, and the Resume button


def starting_values(run: Run) -> dict[str, Any]:
    """What the form starts from: the run's last training settings, else the CPU recipe (on the run's own base
    model)."""
    recorded = run.settings("train")
    if recorded:
        return recorded
    recipe = dict(load_settings(RECIPE))
    recipe.pop("base_model", None)
    return recipe


def plan_text(cfg: TrainConfig, run: Run) -> str:
    """The planner's verdict for these settings on this machine (the GPU when one is seen, else the CPU)."""
    try:
        name = run.base_model(cfg.base_model)
    except ApplianceError as exc:  # no base model yet: say so instead of a prediction
        return f"[yellow]{escape(exc.message)}[/]\n{escape(exc.hint)}"
    gpus = hardware.nvidia_gpus(timeout_s=2.0)
    device, available = planner.device_memory(
        cfg.processes, float(gpus[0].memory_free_mb or gpus[0].memory_total_mb) if gpus else None)
    parameters = run.store.get_model(name).parameters
    try:
        plan = planner.check(cfg, run.store.model_dir(name), parameters, cfg.max_seq_len, device, available)
    except planner.PlanRefused as exc:
        return f"[red]{escape(exc.title)}[/]: {escape(exc.message)}\n[b]hint[/]: {escape(exc.hint)}"
    return f"memory plan: {escape(planner.summary(plan))}: [green]fits[/]"


class TrainScreen(RunScreen):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+s", "start", "Start"),
        Binding("ctrl+x", "stop", "Stop"),
        Binding("ctrl+w", "sweep", "Sweep"),
        Binding("escape", "app.pop_screen", "Back", priority=True),
    ]

    def __init__(self, run_id: str) -> None:
        super().__init__(run_id)
        self.job: jobs.Job | None = None
        self.curves: dict[str, tuple[list[int], list[float]]] = {}
        self.recorded: dict[str, Any] = {}

    def compose(self) -> ComposeResult:
        try:
            self.recorded = starting_values(self.run)
        except ApplianceError:
            self.recorded = {}  # a damaged run.yaml: the form starts from the defaults; starting explains it
        yield Header()
        with Horizontal(id="train-top"):
            with Vertical(id="train-form"):
                yield Static(f"[b]Train[/b] {self.run_id}", id="train-title")
                with Horizontal(id="train-buttons"):
                    yield Button("Start", id="start", variant="primary", compact=True)
                    yield Button("Resume", id="resume", compact=True)
                    yield Button("Stop", id="stop", variant="error", disabled=True, compact=True)
                    yield Button("Sweep…", id="sweep", compact=True)
                with VerticalScroll(id="train-fields"):
                    yield ConfigForm(TrainConfig, exclude=HIDDEN, values=self.recorded, id="train-settings")
                yield Static("", id="train-errors")
                yield Static("", id="train-plan")
            with Vertical(id="train-live"):
                yield PlotextPlot(id="train-plot")
        yield JobPanel("train")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#resume", Button).disabled = not self.run.checkpoints_dir.is_dir()
        self._check_form()
        job = jobs.attach(self.run.path, "train")
        if job is not None:
            self._follow(job)  # its history, and what it does now if it still runs

    # -- the form ----------------------------------------------------------------------------

    @property
    def form(self) -> ConfigForm:
        return self.query_one("#train-settings", ConfigForm)

    def config(self, resume: bool = False) -> TrainConfig | None:
        try:
            cfg: TrainConfig = self.form.validate_with({**self.recorded, "store": str(self.store.root),
                                                        "resume": resume})
        except ApplianceError as exc:
            self.query_one("#train-errors", Static).update("[red]" + escape(exc.message.replace("; ", "\n")) + "[/]")
            return None
        self.query_one("#train-errors", Static).update("")
        return cfg

    @on(Input.Changed)
    @on(Select.Changed)
    @on(Checkbox.Changed)
    def _check_form(self) -> None:
        cfg = self.config()
        if cfg is not None:
            self.plan_preview(cfg)

    @work(thread=True, exclusive=True, group="plan", exit_on_error=False)
    def plan_preview(self, cfg: TrainConfig) -> None:
        text = plan_text(cfg, self.run)
        self.app.call_from_thread(self.query_one("#train-plan", Static).update, text)

    # -- the job -----------------------------------------------------------------------------

    @on(Button.Pressed, "#start")
    def action_start(self) -> None:
        self._launch(resume=False)

    @on(Button.Pressed, "#resume")
    def _resume(self) -> None:
        self._launch(resume=True)

    @on(Button.Pressed, "#sweep")
    def action_sweep(self) -> None:
        self.appliance.open_run(self.run_id, "sweep")

    def _launch(self, resume: bool) -> None:
        if self.job is not None and self.job.running():
            self.notify("Training is already running for this run.", severity="warning")
            return
        cfg = self.config(resume=resume)
        if cfg is None:
            self.notify("Fix the settings first.", severity="error")
            return
        job = self.start_job("train", cfg)
        if job is not None:
            self.curves.clear()
            self._follow(job)

    @on(Button.Pressed, "#stop")
    def action_stop(self) -> None:
        if self.job is None or not self.job.running():
            return
        self.query_one(JobPanel).say("stopping at the next step…")
        self._cancel(self.job)

    @work(thread=True, group="cancel", exit_on_error=False)
    def _cancel(self, job: jobs.Job) -> None:
        job.cancel()

    def _follow(self, job: jobs.Job) -> None:
        self.job = job
        self._set_running(job.running())
        self.query_one(JobPanel).follow(job)

    def _set_running(self, running: bool) -> None:
        self.query_one("#start", Button).disabled = running
        self.query_one("#resume", Button).disabled = running or not self.run.checkpoints_dir.is_dir()
        self.query_one("#stop", Button).disabled = not running

    @on(JobEvent)
    def _event(self, message: JobEvent) -> None:
        event = message.event
        if isinstance(event, ev.Progress) and event.loss is not None:
            self._point("train loss", event.step, event.loss)
        elif isinstance(event, ev.Metric) and event.step is not None and event.name in ("eval_loss", "eval_accuracy"):
            self._point("validation loss" if event.name == "eval_loss" else "validation accuracy", event.step,
                        event.value)

    @on(JobEnded)
    def _ended(self, message: JobEnded) -> None:
        self._set_running(False)
        if message.done is not None:
            result = TrainResult.model_validate(message.done.result)
            self.query_one(JobPanel).say(f"[green]done[/]: {result.steps} steps, train loss {result.train_loss:.4f}, "
                                         f"adapter in {escape(result.adapter)}")

    def _point(self, curve: str, step: int, value: float) -> None:
        xs, ys = self.curves.setdefault(curve, ([], []))
        if xs and xs[-1] >= step:
            return
        xs.append(step)
        ys.append(value)
        plot = self.query_one("#train-plot", PlotextPlot)
        plt = plot.plt
        plt.clear_data()
        plt.title("loss")
        for name, (x, y) in self.curves.items():
            if len(x) > 0:
                plt.plot(x, y, label=name, marker="braille")
        plot.refresh()
