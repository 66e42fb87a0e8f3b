"""Audit: a run's signed manifest (every input and artifact with its sha256, the versions, the
verification and evaluation results) and the verify action: re-hash everything, check the signature."""

from __future__ import annotations

from typing import ClassVar

from rich.markup import escape
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.widgets import Button, DataTable, Footer, Header, Static

from appliance import manifest
from appliance.errors import ApplianceError
from tui.screens.base import RunScreen


class AuditScreen(RunScreen):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("v", "verify", "Verify"),
        Binding("escape", "app.pop_screen", "Back", priority=True),
    ]


    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="audit-head"):
            yield Static(f"[b]Audit[/b] {self.run_id}", id="audit-title")
            yield Button("Verify", id="audit-verify", variant="primary", compact=True)
        yield Static("", id="audit-summary")
        yield Static("", id="audit-result")
        yield DataTable(id="audit-files", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        summary = self.query_one("#audit-summary", Static)
        try:
            manifest = self.run.manifest()
        except ApplianceError as exc:
            summary.update(f"[red]{escape(exc.message)}[/]\n{escape(exc.hint)}")
            return
        if manifest is None:
            summary.update("No manifest yet: `export` writes and signs one.")
            self.query_one("#audit-verify", Button).disabled = True
            return
        entries = manifest.entries()
        signature = manifest.signature
        summary.update("\n".join([
            f"created {escape(manifest.created)}, {len(entries)} files recorded",
            "versions: " + escape(", ".join(f"{k} {v}" for k, v in list(manifest.versions.items())[:8])),
            f"signed ({escape(signature.algorithm)}) with key {escape(signature.key_id)}" if signature is not None
            else "[red]not signed[/]",
        ]))
        table: DataTable[Text] = self.query_one("#audit-files", DataTable)
        table.add_columns("kind", "file", "sha256", "bytes")
        for kind, name, entry in entries:
            table.add_row(Text(kind), Text(name), Text(entry.sha256[:16]), Text(f"{entry.bytes:,}"))

    @on(Button.Pressed, "#audit-verify")
    def action_verify(self) -> None:
        self.query_one("#audit-result", Static).update("verifying: re-hashing every file…")
        self._verify()

    @work(thread=True, exclusive=True, group="verify", exit_on_error=False)
    def _verify(self) -> None:
        try:
            report = manifest.verify(self.run)
        except ApplianceError as exc:
            self.app.call_from_thread(self._result, f"[red]{escape(exc.message)}[/]\n{escape(exc.hint)}")
            return
        if report.ok:
            text = f"[green]verified[/]: {report.checked} files unchanged, signature {escape(report.signature)}"
        else:
            problems = [f"changed: {', '.join(report.changed)}" if report.changed else "",
                        f"missing: {', '.join(report.missing)}" if report.missing else "",
                        f"not recorded: {', '.join(report.unrecorded)}" if report.unrecorded else "",
                        f"signature: {report.signature}" if report.signature != "valid" else ""]
            text = "[red]NOT verified[/]: " + escape("; ".join(p for p in problems if p))
        self.app.call_from_thread(self._result, text)

    def _result(self, text: str) -> None:
        self.query_one("#audit-result", Static).update(text)
