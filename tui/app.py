"""The app: wiring of screens, bindings and command-palette entries, nothing else.

`build_app` is the one factory that `appliance tui` and the tests share. Every long action is a
job (`appliance.jobs`) followed from a thread worker, so the event loop never blocks and a job
that crashes or is killed only ever shows up as an error message; a worker that fails shows its
error in a modal (tui/screens/base.py), with its traceback in the store's logs/tui.log.
"""

from __future__ import annotations

import json
import subprocess
import sys
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

from textual.app import App
from textual.binding import Binding, BindingType
from textual.command import Hit, Hits, Provider
from textual.screen import Screen

from appliance.endpoint import Endpoint
from appliance.errors import ApplianceError
from appliance.fsutil import inside
from appliance.run import exported_models
from appliance.runs import list_runs
from appliance.store import Store
from tui.screens.home import HomeScreen

Doctor = Callable[[], dict[str, Any]]
LOG = "logs/tui.log"


def run_doctor(store: Store) -> dict[str, Any]:
    """`appliance doctor --json` in its own process (it imports torch; the TUI must not)."""
    command = [sys.executable, "-m", "appliance", "--store", str(store.root), "doctor", "--json"]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        report: dict[str, Any] = json.loads(out.stdout)
        return report
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        return {"ok": False, "checks": [{"name": "gpu", "status": "fail", "detail": f"doctor did not run: {exc}"}]}


class Actions(Provider):
    """Command-palette entries for every action, including one per run and per exported model."""

    async def search(self, query: str) -> Hits:
        app = self.app
        assert isinstance(app, ApplianceApp)
        matcher = self.matcher(query)
        entries: list[tuple[str, Callable[[], Any], str]] = [
            ("New run", app.new_run, "prepare data files into a new run"),
            ("Home", app.go_home, "the machine, the store and the runs"),
            ("Models", app.action_models, "base models in the store; import one"),
            ("Serve", app.action_serve, "start and stop the OpenAI-compatible endpoint"),
        ]
        for run in list_runs(app.store, limit=30):
            for verb, stage in (("Data of", "data"), ("Train", "train"), ("Sweep", "sweep"), ("Evaluate", "evaluate"),
                                ("Export", "export"), ("Audit", "audit")):
                entries.append((f"{verb} {run.id}", partial(app.open_run, run.id, stage),
                                f"{run.task or ''} run; done: {' '.join(run.stages) or 'nothing yet'}"))
        for name in exported_models(app.store):
            entries.append((f"Chat with {name}", partial(app.open_chat, name), "stream answers from the model"))
        for text, action, help_text in entries:
            score = matcher.match(text)
            if score > 0:
                yield Hit(score, matcher.highlight(text), action, help=help_text)


class ApplianceApp(App[None]):
    TITLE = "appliance"
    SUB_TITLE = "offline fine-tuning"
    CSS_PATH = "app.tcss"
    COMMANDS = App.COMMANDS | {Actions}
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+q", "quit", "Quit", priority=True),
        Binding("h", "go_home", "Home"),
        Binding("c", "chat", "Chat"),
        Binding("m", "models", "Models"),
        Binding("s", "serve", "Serve"),
        Binding("f1", "stage('data')", "Data"),
        Binding("f2", "stage('train')", "Train"),
        Binding("f3", "stage('evaluate')", "Evaluate"),
        Binding("f4", "stage('export')", "Export"),
        Binding("f5", "stage('audit')", "Audit"),
    ]

    def __init__(self, store: Store, doctor: Doctor | None = None) -> None:
        super().__init__()
        self.store = store
        self._doctor = doctor
        self.endpoint: Endpoint | None = None  # the endpoint started from the Serve screen

    def stop_endpoint(self) -> None:
        """SIGTERM: the endpoint stops accepting and finishes the answers in flight."""
        if self.endpoint is not None:
            self.endpoint.stop()

    def on_unmount(self) -> None:
        self.stop_endpoint()

    @property
    def log_path(self) -> Path:
        return inside(self.store.root, LOG, "log")

    def report_error(self, error: BaseException, where: str = "") -> None:
        """An error no screen handled: its traceback to the log, and a modal that says what to do."""
        from tui.screens.error import ErrorScreen

        try:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a", encoding="utf-8") as log:
                log.write(f"--- {where or 'worker'}\n")
                log.write("".join(traceback.format_exception(error)))
            log_name: str | None = str(self.log_path)
        except OSError:
            log_name = None  # the modal still says what happened
        if isinstance(error, ApplianceError):
            self.push_screen(ErrorScreen(error.title, error.message, error.hint, log_name))
        else:
            self.push_screen(ErrorScreen(f"Unexpected error{f' in {where}' if where else ''}",
                                         f"{type(error).__name__}: {error}",
                                         "The screen may show less than it should; the traceback is in the log.",
                                         log_name))

    def action_models(self) -> None:
        if not isinstance(self.focused, _typing_widgets()):
            from tui.screens.models import ModelsScreen

            self.push_screen(ModelsScreen())

    def action_serve(self) -> None:
        if not isinstance(self.focused, _typing_widgets()):
            from tui.screens.serve import ServeScreen

            self.push_screen(ServeScreen())

    def doctor(self) -> dict[str, Any]:
        return self._doctor() if self._doctor is not None else run_doctor(self.store)

    def get_default_screen(self) -> Screen[Any]:
        return HomeScreen()

    def go_home(self) -> None:
        while len(self.screen_stack) > 2:
            self.pop_screen()
        if not isinstance(self.screen, HomeScreen):
            self.pop_screen()
        self.refresh_home()

    def action_go_home(self) -> None:
        if not isinstance(self.focused, _typing_widgets()):
            self.go_home()

    def refresh_home(self) -> None:
        home = self.screen_stack[0] if self.screen_stack else None
        if isinstance(home, HomeScreen):
            home.action_refresh()

    def open_run(self, run_id: str, stage: str = "train") -> None:
        """Open a run at one of its stages; from another stage of a run, that screen is replaced."""
        from tui.screens.audit import AuditScreen
        from tui.screens.base import RunScreen
        from tui.screens.data import DataScreen
        from tui.screens.evaluate import EvaluateScreen
        from tui.screens.export import ExportScreen
        from tui.screens.sweep import SweepScreen
        from tui.screens.train import TrainScreen

        screens: dict[str, Callable[[str], Screen[Any]]] = {
            "data": DataScreen, "train": TrainScreen, "sweep": SweepScreen, "evaluate": EvaluateScreen,
            "export": ExportScreen, "audit": AuditScreen}
        screen = screens[stage](run_id)
        if isinstance(self.screen, RunScreen):
            self.switch_screen(screen)
        else:
            self.push_screen(screen)

    def action_stage(self, stage: str) -> None:
        from tui.screens.base import RunScreen

        run_id = self.screen.run_id if isinstance(self.screen, RunScreen) else None
        if run_id is None and isinstance(self.screen, HomeScreen):
            run = self.screen.selected_run()
            run_id = run.id if run is not None else None
        if run_id is None:
            self.notify("Select a run on Home first.", severity="warning")
            return
        self.open_run(run_id, stage)

    def new_run(self) -> None:
        from tui.screens.new_run import NewRunScreen

        def prepared(run_id: str | None) -> None:
            self.refresh_home()
            if run_id:
                self.notify(f"data prepared into {run_id}: F2 to train")
                self.open_run(run_id, "data")

        self.push_screen(NewRunScreen(), prepared)

    def open_chat(self, model: str) -> None:
        from tui.screens.chat import ChatScreen

        self.push_screen(ChatScreen(model))

    def action_chat(self) -> None:
        from tui.screens.base import RunScreen

        if isinstance(self.focused, _typing_widgets()):
            return
        screen = self.screen
        selected = screen.selected_run() if isinstance(screen, HomeScreen) else None
        run_id = selected.id if selected is not None else screen.run_id if isinstance(screen, RunScreen) else None
        if run_id is not None and self.store.run(run_id).exported:
            self.open_chat(run_id)
        else:
            self.notify("Open or select an exported run, or pick 'Chat with …' in the command palette (ctrl+p).",
                        severity="warning")


def _typing_widgets() -> tuple[type, ...]:
    from textual.widgets import Input, TextArea

    return (Input, TextArea)


def build_app(store_root: Path | None = None, doctor: Doctor | None = None) -> ApplianceApp:
    return ApplianceApp(Store.open(store_root), doctor)
