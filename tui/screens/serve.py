"""Serve: start and stop the OpenAI-compatible endpoint for an exported model, see its address
and key, and watch its requests arrive (the audit log, read as it grows).

The endpoint is `appliance serve` in its own process, run through `appliance.endpoint`: the UI never
loads the model. It stops when you press Stop or leave the app.
"""

from __future__ import annotations

import time
from typing import ClassVar

from rich.markup import escape
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Checkbox, DataTable, Footer, Header, Input, Select, Static
from textual.worker import get_current_worker

from appliance.endpoint import AuditRecord, Endpoint
from appliance.errors import ApplianceError
from appliance.run import exported_models
from tui.screens.base import AppScreen


class ServeScreen(AppScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "app.pop_screen", "Back", priority=True),
    ]

    def compose(self) -> ComposeResult:
        names = sorted(exported_models(self.store))
        yield Header()
        with Vertical(id="serve-form"):
            yield Static("[b]Serve[/b] an exported model as an OpenAI-compatible endpoint", id="serve-title")
            with Horizontal(classes="field"):
                yield Static("model", classes="field-label")
                yield Select([(n, n) for n in names], id="serve-model", allow_blank=not names,
                             value=names[0] if names else Select.NULL)
            with Horizontal(classes="field"):
                yield Static("address", classes="field-label")
                yield Input("127.0.0.1", id="serve-host")
                yield Input("8000", id="serve-port")
            with Horizontal(classes="field"):
                yield Static("API key", classes="field-label")
                yield Checkbox("require a key (needed beyond 127.0.0.1)", False, id="serve-key", compact=True)
            with Horizontal(id="serve-buttons"):
                yield Button("Start", id="serve-start", variant="primary", compact=True)
                yield Button("Stop", id="serve-stop", variant="error", compact=True, disabled=True)
            yield Static("not running", id="serve-status")
        yield DataTable(id="serve-requests", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#serve-requests", DataTable).add_columns("time", "client", "path", "status", "tokens", "ms")
        endpoint = self.appliance.endpoint
        if endpoint is not None and endpoint.running():
            self._show_running(endpoint)

    @on(Button.Pressed, "#serve-start")
    def start(self) -> None:
        model = self.query_one("#serve-model", Select).value
        if model is Select.NULL:
            self.notify("Export a run first: there is no model to serve.", severity="error")
            return
        port = self.query_one("#serve-port", Input).value.strip()
        try:
            endpoint = Endpoint.start(self.store, str(model), self.query_one("#serve-host", Input).value.strip(),
                                      int(port) if port.isdigit() else 0,
                                      with_key=self.query_one("#serve-key", Checkbox).value)
        except ApplianceError as exc:
            self.notify(f"{exc.message}\n{exc.hint}", title="Cannot start the endpoint", severity="error",
                        timeout=12)
            return
        self.appliance.endpoint = endpoint
        self._show_running(endpoint)

    def _show_running(self, endpoint: Endpoint) -> None:
        self.query_one("#serve-status", Static).update(
            f"starting {escape(endpoint.model)} at {escape(endpoint.url)} …{self._key_line(endpoint)}")
        self.query_one("#serve-start", Button).disabled = True
        self.query_one("#serve-stop", Button).disabled = False
        self.watch_requests(endpoint)

    @staticmethod
    def _key_line(endpoint: Endpoint) -> str:
        return f"\nkey: {escape(endpoint.key)}  (send as 'Authorization: Bearer KEY')" if endpoint.key else ""

    @work(thread=True, exclusive=True, group="serve-log", exit_on_error=False)
    def watch_requests(self, endpoint: Endpoint) -> None:
        """Follow the audit log while the endpoint runs; say when it is up, and when it ended."""
        worker = get_current_worker()
        announced = False
        while not worker.is_cancelled:
            ended = not endpoint.running()
            for record in endpoint.requests():
                if record.event == "start" and not announced:
                    announced = True
                    self.app.call_from_thread(self._up, endpoint, record)
                elif record.event is None:
                    self.app.call_from_thread(self._request, record)
            if ended:
                endpoint.close()
                self.app.call_from_thread(self._down, endpoint)
                return
            time.sleep(0.3)

    def _up(self, endpoint: Endpoint, record: AuditRecord) -> None:
        verified = "verified" if record.verified else "[yellow]not verified[/]"
        self.query_one("#serve-status", Static).update(
            f"[green]serving[/] {escape(str(record.model))} ({verified}, sha256 "
            f"{escape(str(record.model_sha256 or '')[:12])}) at {escape(endpoint.url)}{self._key_line(endpoint)}")

    def _request(self, record: AuditRecord) -> None:
        status = record.status or 0
        table: DataTable[Text] = self.query_one("#serve-requests", DataTable)
        table.add_row(Text(record.time[11:19]), Text(str(record.client)), Text(str(record.path)),
                      Text(str(status), style="green" if status < 400 else "red"),
                      Text(f"{record.prompt_tokens or 0}+{record.completion_tokens or 0}"),
                      Text(f"{record.latency_ms or 0:.0f}"))

    def _down(self, endpoint: Endpoint) -> None:
        code = endpoint.returncode
        message = "stopped" if code in (0, -15) else \
            f"[red]ended with status {code}[/]: see {escape(str(endpoint.log_path))}"
        self.query_one("#serve-status", Static).update(message)
        self.query_one("#serve-start", Button).disabled = False
        self.query_one("#serve-stop", Button).disabled = True

    @on(Button.Pressed, "#serve-stop")
    def stop(self) -> None:
        self.appliance.stop_endpoint()
        self.query_one("#serve-status", Static).update("stopping: answers in flight finish first…")
