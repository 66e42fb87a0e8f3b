"""Train: the run's training settings as a form (checked as you type, with the memory planner's
prediction), start / stop / resume, and the job live: progress, tokens/s, ETA, memory, the loss
curves and the log. Opening a run whose training is running (started by an earlier TUI or the
CLI) attaches to it and replays its history."""

from __future__ import annotations

from typing import Any, ClassVar

from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Footer, Header, Input, Label, Static
from textual_plotext import PlotextPlot

from appliance import events as ev
from appliance import jobs
from appliance.config import TrainConfig
from appliance.errors import ApplianceError, StoreError
from appliance.store import Store
from tui.follow import JobEnded, JobEvent
from tui.screens.run import RunScreen
from tui.widgets.job_panel import JobPanel

FIELDS: dict[str, tuple[str, type]] = {  # config field -> (label, type)
    "max_steps": ("steps", int),
    "batch_size": ("batch size", int),
    "max_seq_len": ("max tokens per row", int),
    "learning_rate": ("learning rate", float),
    "rank": ("LoRA rank", int),
    "eval_every": ("evaluate every", int),
    "processes": ("processes (GPUs)", int),
}


def describe_plan(cfg: TrainConfig, store: Any) -> str:
    """The planner's prediction for these settings on this machine (CPU unless a GPU is seen)."""
    import json

    from appliance import hardware
    from appliance import planner

    try:
        name = store.resolve_model(cfg.base_model, "base model", "Import one in Models.")
    except ApplianceError as exc:  # no base model yet: say so instead of a prediction
        return f"[yellow]{escape(str(exc))}[/]"
    model_dir = store.model_dir(name)
    parameters = json.loads((model_dir / "source.json").read_text(encoding="utf-8"))["parameters"]
    gpus = hardware.nvidia_gpus(timeout_s=2.0)
    device, available = ("cuda", float(gpus[0].memory_free_mb or gpus[0].memory_total_mb)) if gpus else \
        ("cpu", float(hardware.memory().available_mb) / cfg.processes)  # the processes share the machine's RAM
    plan = planner.plan(cfg, model_dir, parameters, cfg.max_seq_len, device, available)
    verdict = "[green]fits[/]" if plan.fits else "[red]does not fit[/]"
    each = f" per process ({cfg.world_size}, {cfg.sharding.upper()})" if cfg.world_size > 1 else ""
    return (f"memory plan: about {plan.peak_mb / 1024:.1f} GiB at peak on {device}{each}, "
            f"{plan.available_mb / 1024:.1f} GiB available: {verdict}")


class TrainScreen(RunScreen):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+s", "start", "Start"),
        Binding("ctrl+x", "stop", "Stop"),
        Binding("escape", "app.pop_screen", "Back", priority=True),
    ]

    def __init__(self, run_id: str) -> None:
        super().__init__(run_id)
        self.job: jobs.Job | None = None
        self.curves: dict[str, tuple[list[int], list[float]]] = {}

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="train-top"):
            with Vertical(id="train-form"):
                yield Static(f"[b]Train[/b] {self.run_id}", id="train-title")
                with Horizontal(id="train-buttons"):
                    yield Button("Start", id="start", variant="primary", compact=True)
                    yield Button("Resume", id="resume", compact=True)
                    yield Button("Stop", id="stop", variant="error", disabled=True, compact=True)
                for name, (label, _kind) in FIELDS.items():
                    with Horizontal(classes="field"):
                        yield Label(label, classes="field-label")
                        yield Input(id=f"f-{name}", classes="field-input")
                yield Static("", id="train-errors")
                yield Static("", id="train-plan")
            with Vertical(id="train-live"):
                yield PlotextPlot(id="train-plot")
        yield JobPanel("train")
        yield Footer()

    def on_mount(self) -> None:
        defaults = {"max_steps": 100, "batch_size": 4, "max_seq_len": 512, "learning_rate": 2e-4, "rank": 16,
                    "eval_every": 25, "processes": 1}
        recorded = self._recorded()
        for name in FIELDS:
            self.query_one(f"#f-{name}", Input).value = str(recorded.get(name) or defaults[name])
        self.query_one("#resume", Button).disabled = not (self.run_dir / "checkpoints").is_dir()
        self._check_form()
        job = jobs.attach(self.run_dir)
        if job is not None and job.stage == "train" and (job.running() or job.events_path.exists()):
            self._follow(job)

    def _recorded(self) -> dict[str, Any]:
        try:
            return Store.stage_config(self.run_dir, "train")
        except StoreError:
            return {}  # the form starts from the recipe; starting the training explains the damage

    # -- the form ----------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, (_label, kind) in FIELDS.items():
            text = self.query_one(f"#f-{name}", Input).value.strip()
            try:
                values[name] = kind(text)
            except ValueError:
                values[name] = text  # the config's validation names the field
        return {**self._recorded(), **values, "store": str(self.app.store.root)}  # type: ignore[attr-defined]

    def config(self, resume: bool = False) -> TrainConfig | None:
        from pydantic import ValidationError

        try:
            cfg = TrainConfig(**{**self.settings(), "resume": resume})
        except ValidationError as exc:
            problems = [f"{FIELDS.get(str(e['loc'][0]), (str(e['loc'][0]),))[0]}: {e['msg']}" for e in exc.errors()]
            self.query_one("#train-errors", Static).update("[red]" + escape("\n".join(problems)) + "[/]")
            return None
        self.query_one("#train-errors", Static).update("")
        return cfg

    @on(Input.Changed)
    def _check_form(self) -> None:
        cfg = self.config()
        if cfg is not None:
            self.plan_preview(cfg)

    @work(thread=True, exclusive=True, group="plan", exit_on_error=False)
    def plan_preview(self, cfg: TrainConfig) -> None:
        text = describe_plan(cfg, self.app.store)  # type: ignore[attr-defined]
        self.app.call_from_thread(self.query_one("#train-plan", Static).update, text)

    # -- the job -----------------------------------------------------------------------------

    @on(Button.Pressed, "#start")
    def action_start(self) -> None:
        self._launch(resume=False)

    @on(Button.Pressed, "#resume")
    def _resume(self) -> None:
        self._launch(resume=True)

    def _launch(self, resume: bool) -> None:
        if self.job is not None and self.job.running():
            self.notify("Training is already running for this run.", severity="warning")
            return
        cfg = self.config(resume=resume)
        if cfg is None:
            self.notify("Fix the settings first.", severity="error")
            return
        job = self.start_job("train", cfg, record=cfg.model_dump(mode="json", exclude={"resume"}))
        if job is None:
            return
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
        self.query_one("#resume", Button).disabled = running or not (self.run_dir / "checkpoints").is_dir()
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
            result = message.done.result
            adapter = escape(str(result.get("adapter")))
            self.query_one(JobPanel).say(f"[green]done[/]: {result.get('steps')} steps, train loss "
                                         f"{result.get('train_loss', float('nan')):.4f}, adapter in {adapter}")

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
