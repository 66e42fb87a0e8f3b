"""What every screen shares: the typed app it belongs to, and one way of reporting a worker that failed.

A thread worker that raises (a file that cannot be read, a bug) must not leave a blank panel: every screen
and widget that runs workers handles `Worker.StateChanged` here, and the app shows the error in a modal with
the log file that holds its traceback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from textual.screen import ModalScreen, Screen
from textual.worker import Worker, WorkerState

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


class ReportsWorkerErrors:
    """Mixed into every screen and widget that runs thread workers: a worker that fails is shown, not lost."""

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR and event.worker.error is not None:
            appliance_of(self).report_error(event.worker.error, event.worker.name)


class AppScreen(ReportsWorkerErrors, Screen[T]):
    @property
    def appliance(self) -> ApplianceApp:
        return appliance_of(self)

    @property
    def store(self) -> Store:
        return self.appliance.store


class AppModal(ReportsWorkerErrors, ModalScreen[T]):
    @property
    def appliance(self) -> ApplianceApp:
        return appliance_of(self)

    @property
    def store(self) -> Store:
        return self.appliance.store


class RunScreen(AppScreen[None]):
    """A screen of one run."""

    def __init__(self, run_id: str) -> None:
        super().__init__()
        self.run_id = run_id

    @property
    def run(self) -> Run:
        return self.store.run(self.run_id)
