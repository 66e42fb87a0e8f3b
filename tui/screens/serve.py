"""Serve: start and stop the OpenAI-compatible endpoint for an exported model, see its address
and key, and watch its requests arrive (the audit log, read as it grows).

The endpoint is `appliance serve` in its own process: the UI never loads the model. It stops when
you press Stop or leave the app.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

from rich.markup import escape
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Button, Checkbox, DataTable, Footer, Header, Input, Select, Static

from appliance.config import is_loopback


class ServeScreen(Screen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "app.pop_screen", "Back", priority=True),
    ]

    def compose(self) -> ComposeResult:
        from appliance.serve.model import exported

        names = sorted(exported(self.app.store))  # type: ignore[attr-defined]
        yield Header()
        with Vertical(id="serve-form"):
            yield Static("[b]Serve[/b] an exported model as an OpenAI-compatible endpoint", id="serve-title")
            with Horizontal(classes="field"):
                yield Static("model", classes="field-label")
                choose: Select[str] = Select([(n, n) for n in names], id="serve-model", allow_blank=not names)
                if names:
                    choose.value = names[0]
                yield choose
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
        self.query_one("#serve-requests", DataTable).add_columns("time", "client", "path", "status", "tokens",
                                                                  "ms")
        server = self.app.server  # type: ignore[attr-defined]
        if server is not None and server["process"].poll() is None:
            self._show_running(server)

    @property
    def audit_path(self) -> Path:
        return Path(self.app.store.root) / "audit" / "serve.jsonl"  # type: ignore[attr-defined]

    @on(Button.Pressed, "#serve-start")
    def start(self) -> None:
        model = self.query_one("#serve-model", Select).value
        host = self.query_one("#serve-host", Input).value.strip()
        port = self.query_one("#serve-port", Input).value.strip()
        use_key = self.query_one("#serve-key", Checkbox).value
        if model is Select.BLANK:
            self.notify("Export a run first: there is no model to serve.", severity="error")
            return
        if not use_key and not is_loopback(host):
            self.notify(f"Listening on {host} needs an API key: tick 'require a key'.", severity="error")
            return
        store = self.app.store  # type: ignore[attr-defined]
        command = [sys.executable, "-m", "appliance", "--store", str(store.root), "serve", str(model),
                   "--host", host, "--port", port]
        key = None
        if use_key:
            key = secrets.token_urlsafe(32)
            key_file = Path(store.root) / "keys" / "serve-api-key"
            key_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            descriptor = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                handle.write(key + "\n")
            command += ["--api-key-file", str(key_file)]
        offset = self.audit_path.stat().st_size if self.audit_path.exists() else 0
        (Path(store.root) / "audit").mkdir(parents=True, exist_ok=True)
        log = open(Path(store.root) / "audit" / "serve.log", "ab")  # noqa: SIM115 (the server owns it)
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        server = {"process": process, "host": host, "port": port, "key": key, "model": model, "offset": offset,
                  "log": log}
        self.app.server = server  # type: ignore[attr-defined]
        self._show_running(server)

    def _show_running(self, server: dict[str, Any]) -> None:
        host = f"[{server['host']}]" if ":" in server["host"] else server["host"]
        key = f"\nkey: {escape(server['key'])}  (send as 'Authorization: Bearer KEY')" if server["key"] else ""
        self.query_one("#serve-status", Static).update(
            f"starting {escape(str(server['model']))} at http://{escape(host)}:{escape(server['port'])}/v1 …{key}")
        self.query_one("#serve-start", Button).disabled = True
        self.query_one("#serve-stop", Button).disabled = False
        self.watch_requests(server)

    @work(thread=True, exclusive=True, group="serve-log", exit_on_error=False)
    def watch_requests(self, server: dict[str, Any]) -> None:
        """Follow the audit log while the server runs; say when it is up, and when it ended."""
        from textual.worker import get_current_worker

        worker = get_current_worker()
        offset, announced = server["offset"], False
        while not worker.is_cancelled:
            ended = server["process"].poll() is not None
            if self.audit_path.exists():
                with open(self.audit_path, encoding="utf-8") as handle:
                    handle.seek(offset)
                    lines = handle.readlines()
                    offset = handle.tell()
                for line in lines:
                    record = json.loads(line)
                    if record.get("event") == "start" and not announced:
                        announced = True
                        self.app.call_from_thread(self._up, server, record)
                    elif "event" not in record:
                        self.app.call_from_thread(self._request, record)
            if ended:
                server["log"].close()
                self.app.call_from_thread(self._down, server["process"].returncode)
                return
            time.sleep(0.3)

    def _up(self, server: dict[str, Any], record: dict[str, Any]) -> None:
        host = f"[{server['host']}]" if ":" in server["host"] else server["host"]
        key = f"\nkey: {escape(server['key'])}  (send as 'Authorization: Bearer KEY')" if server["key"] else ""
        verified = "verified" if record.get("verified") else "[yellow]not verified[/]"
        self.query_one("#serve-status", Static).update(
            f"[green]serving[/] {escape(str(record.get('model')))} ({verified}, sha256 "
            f"{escape(str(record.get('model_sha256', ''))[:12])}) at http://{escape(host)}:"
            f"{escape(server['port'])}/v1{key}")

    def _request(self, record: dict[str, Any]) -> None:
        tokens = f"{record.get('prompt_tokens') or 0}+{record.get('completion_tokens') or 0}"
        status = int(record.get("status") or 0)
        self.query_one("#serve-requests", DataTable).add_row(
            Text(str(record.get("time", ""))[11:19]), Text(str(record.get("client"))), Text(str(record.get("path"))),
            Text(str(status), style="green" if status < 400 else "red"), Text(tokens),
            Text(f"{record.get('latency_ms', 0):.0f}"))

    def _down(self, returncode: int | None) -> None:
        message = "stopped" if returncode in (0, -15) else f"[red]ended with status {returncode}[/]: see " \
            f"{escape(str(Path(self.app.store.root) / 'audit' / 'serve.log'))}"  # type: ignore[attr-defined]
        self.query_one("#serve-status", Static).update(message)
        self.query_one("#serve-start", Button).disabled = False
        self.query_one("#serve-stop", Button).disabled = True

    @on(Button.Pressed, "#serve-stop")
    def stop(self) -> None:
        self.app.stop_server()  # type: ignore[attr-defined]
        self.query_one("#serve-status", Static).update("stopping: answers in flight finish first…")
