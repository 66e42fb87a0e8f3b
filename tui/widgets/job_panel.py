"""A job, live: what it is doing (progress, tokens/s, ETA, memory), a progress bar and its log.

`JobPanel.follow(job)` reads the job's events from a thread worker; each `JobEvent` updates the
panel and then bubbles on to the screen (which may plot metrics), and `JobEnded` tells the screen
how the job ended. A job killed from outside ends in a readable error, never a crash of the UI.
"""

from __future__ import annotations

from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import ProgressBar, RichLog, Static

from appliance import events as ev
from appliance.jobs import Job
from tui.follow import JobEnded, JobEvent, follow
from tui.screens.base import AppPart


class JobPanel(AppPart, Vertical):
    def __init__(self, prefix: str, idle: str = "not started") -> None:
        super().__init__(id=f"{prefix}-job", classes="job-panel")
        self.prefix = prefix
        self.idle = idle
        self.job: Job | None = None

    def on_mount(self) -> None:
        self.display = bool(self.idle)  # a panel with nothing to say stays out of the way until a job runs
        self.query_one(ProgressBar).display = False

    def compose(self) -> ComposeResult:
        yield Static(self.idle, id=f"{self.prefix}-status", classes="job-status")
        yield ProgressBar(id=f"{self.prefix}-progress", show_eta=False)
        yield RichLog(id=f"{self.prefix}-log", wrap=True, markup=True, max_lines=500, classes="job-log")

    @property
    def running(self) -> bool:
        return self.job is not None and self.job.running()

    def follow(self, job: Job, fresh: bool = True) -> None:
        self.job = job
        self.display = True
        self.query_one(ProgressBar).display = True
        if fresh:
            self.query_one(RichLog).clear()
        self._follow(job)

    def say(self, markup: str) -> None:
        self.query_one(f"#{self.prefix}-status", Static).update(markup)

    @work(thread=True, exclusive=True, exit_on_error=False)
    def _follow(self, job: Job) -> None:
        follow(job, self)

    @on(JobEvent)
    def _event(self, message: JobEvent) -> None:
        event = message.event
        if isinstance(event, ev.Progress):
            self.query_one(ProgressBar).update(total=event.total, progress=event.step)
            self.say(escape(event.describe()))
        elif isinstance(event, ev.Log):
            style = {"warning": "yellow", "error": "red"}.get(event.level, "")
            text = escape(event.message)
            self.query_one(RichLog).write(f"[{style}]{text}[/]" if style else text)

    @on(JobEnded)
    def _ended(self, message: JobEnded) -> None:
        if message.error is not None:
            error = message.error
            self.say(f"[red]{escape(error.title)}[/]: {escape(error.message)}")
            self.query_one(RichLog).write(f"[red]{escape(error.title)}: {escape(error.message)}[/]\n"
                                          f"{escape(error.hint)}")
            if message.job is self.job:
                self.notify(f"{error.message}\n{error.hint}", title=error.title, severity="error", timeout=10)
        else:
            bar = self.query_one(ProgressBar)
            if bar.total is not None:
                bar.update(progress=bar.total)
