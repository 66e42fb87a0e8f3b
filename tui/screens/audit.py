"""Audit: a run's signed manifest (every input and artifact with its sha256, the versions, the
verification and evaluation results) and the verify action: re-hash everything, check the signature."""

from __future__ import annotations

from typing import Any, ClassVar

from rich.markup import escape
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.widgets import Button, DataTable, Footer, Header, Static

from appliance.fsutil import read_json_object
from tui.screens.run import RunScreen


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
        manifest = read_json_object(self.run_dir / "manifest.json")
        summary = self.query_one("#audit-summary", Static)
        if not manifest:
            summary.update("No manifest yet: `export` writes and signs one.")
            self.query_one("#audit-verify", Button).disabled = True
            return
        versions = manifest.get("versions") or {}
        signature = manifest.get("signature") or {}
        summary.update("\n".join([
            f"created {escape(str(manifest.get('created')))}, {len(_entries(manifest))} files recorded",
            "versions: " + escape(", ".join(f"{k} {v}" for k, v in list(versions.items())[:8])),
            f"signed ({escape(str(signature.get('algorithm')))}) with key {escape(str(signature.get('key_id')))}",
        ]))
        table = self.query_one("#audit-files", DataTable)
        table.add_columns("kind", "file", "sha256", "bytes")
        for kind, name, entry in _entries(manifest):
            table.add_row(Text(kind), Text(name), Text(str(entry.get("sha256", ""))[:16]),
                          Text(f"{entry.get('bytes', 0):,}"))

    @on(Button.Pressed, "#audit-verify")
    def action_verify(self) -> None:
        self.query_one("#audit-result", Static).update("verifying: re-hashing every file…")
        self._verify()

    @work(thread=True, exclusive=True, group="verify", exit_on_error=False)
    def _verify(self) -> None:
        from appliance.errors import ApplianceError
        from appliance import manifest

        try:
            report: Any = manifest.verify(self.app.store, self.run_dir)  # type: ignore[attr-defined]
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


def _entries(manifest: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """Every recorded file: the data inputs, the base model's files, the run's own files."""
    inputs = manifest.get("inputs") or {}
    rows: list[tuple[str, str, dict[str, Any]]] = []
    for entry in inputs.get("data") or []:
        if isinstance(entry, dict):
            rows.append(("data", str(entry.get("path")), entry))
    base = inputs.get("base_model") or {}
    for name, entry in (base.get("files") or {}).items():
        rows.append(("base model", f"{base.get('name')}/{name}", entry if isinstance(entry, dict) else {}))
    for name, entry in (manifest.get("files") or {}).items():
        rows.append(("run", name, entry if isinstance(entry, dict) else {}))
    return rows
