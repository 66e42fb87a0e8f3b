"""What every screen shares: the typed app it belongs to, and one way of reporting a worker that failed.

A thread worker that raises (a file that cannot be read, a bug) must not leave a blank panel: every screen
and widget that runs workers handles `Worker.StateChanged` here, and the app shows the error in a modal with
the log file that holds its traceback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from pydantic import BaseModel
from textual.screen import ModalScreen, Screen
from textual.worker import Worker, WorkerState

from appliance import jobs
from appliance.errors import ApplianceError
from appliance.run import Run
from appliance.store import Store

if TYPE_CHECKING:
    from tui.app import ApplianceApp

T = TypeVar("T")


def appliance_of(node: object) -> ApplianceApp:
    from textual.dom import DOMNode

    from tui.app import ApplianceApp

    app = node.app if isinstance(node, DOMNode) else None
    if not isinstance(app, ApplianceApp):
        raise TypeError("this widget belongs to the appliance's app")
    return app


class AppPart:
    """Mixed into every screen and widget of the app: the typed app and its store, and a worker that fails
    is shown, not lost."""

    @property
    def appliance(self) -> ApplianceApp:
        return appliance_of(self)

    @property
    def store(self) -> Store:
        return self.appliance.store

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR and event.worker.error is not None:
            appliance_of(self).report_error(event.worker.error, event.worker.name)


class AppScreen(AppPart, Screen[T]):
    pass


class AppModal(AppPart, ModalScreen[T]):
    pass


class RunScreen(AppScreen[None]):
    """A screen of one run: it shows the last job of its own stage, and starts that stage's jobs."""

    def __init__(self, run_id: str) -> None:
        super().__init__()
        self.run_id = run_id

    @property
    def run(self) -> Run:
        return self.store.run(self.run_id)

    def last_job(self, stage: str) -> jobs.Job | None:
        """The run's last job of `stage`, shown in the screen's job panel (its history, or it live)."""
        from tui.widgets.job_panel import JobPanel

        job = jobs.attach(self.run.path, stage)
        if job is not None:
            self.query_one(JobPanel).follow(job)
        return job

    def start_job(self, stage: str, cfg: BaseModel) -> jobs.Job | None:
        """Start a stage on this run; None (with the reason shown) when it cannot start, e.g. while another
        job of the run is still running."""
        try:
            return jobs.start(stage, self.run.path, cfg)
        except ApplianceError as exc:
            self.notify(f"{exc.message}\n{exc.hint}", title=exc.title, severity="error", timeout=12)
            return None
