"""Export: pick quantizations (each described, with its predicted size), run the export job, and
read the verification gate's results check by check, with where the files and the Modelfile are."""

from __future__ import annotations

from typing import ClassVar

from rich.markup import escape
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, DataTable, Footer, Header, Input, Label, SelectionList, Static
from textual.widgets.selection_list import Selection

from appliance import quants
from appliance.config import ExportConfig
from appliance.errors import ApplianceError
from appliance.fields import validated
from appliance.quants import QUANTS, RECOMMENDED
from tui.follow import JobEnded
from tui.screens.base import RunScreen
from tui.widgets.job_panel import JobPanel

MARK = {"pass": Text("pass", style="green"), "warn": Text("warn", style="yellow"), "fail": Text("FAIL", style="red")}


class ExportScreen(RunScreen):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+s", "start", "Export"),
        Binding("escape", "app.pop_screen", "Back", priority=True),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="export-top"):
            with Vertical(id="export-choose"):
                yield Static(f"[b]Export[/b] {self.run_id}", id="export-title")
                choices = [Selection(f"{q.name}: {q.description}", q.name, q.name == RECOMMENDED)
                           for q in QUANTS.values() if q.name not in ("F16", "BF16")]
                yield SelectionList[str](*choices, id="export-quants")
                with Horizontal(classes="field"):
                    yield Label("perplexity tokens", classes="field-label")
                    yield Input("4096", id="export-ppl", type="integer", tooltip="validation tokens scored per "
                                "file by the gate: fewer is faster, more is a finer measure")
                yield Button("Export and verify", id="export-start", variant="primary", compact=True)
            with Vertical(id="export-results"):
                yield Static("", id="export-files")
                yield DataTable(id="export-checks", zebra_stripes=True)
        yield JobPanel("export", idle="")
        yield Footer()

    def on_mount(self) -> None:
        self.predict_sizes()
        self.show()
        self.last_job("export")

    @work(thread=True, exclusive=True, group="sizes", exit_on_error=False)
    def predict_sizes(self) -> None:
        """Predicted sizes from the tensor shapes of the base model (the merged model has the same)."""
        try:
            model_dir = self.run.base_model_dir()
        except ApplianceError:
            return  # no base model to size: the list stays without sizes
        sizes = {name: quants.predict(model_dir, name).bytes for name in QUANTS}
        self.app.call_from_thread(self._sizes, sizes)

    def _sizes(self, sizes: dict[str, int]) -> None:
        chooser: SelectionList[str] = self.query_one("#export-quants", SelectionList)
        chosen = set(chooser.selected)
        chooser.clear_options()
        for q in QUANTS.values():
            if q.name in ("F16", "BF16"):
                continue
            prompt = f"{q.name} ~{sizes[q.name] / 2**20:,.0f} MiB: {q.description}"
            chooser.add_option(Selection(prompt, q.name, q.name in chosen))

    def show(self) -> None:
        files = self.query_one("#export-files", Static)
        table: DataTable[Text] = self.query_one("#export-checks", DataTable)
        table.clear(columns=True)
        run = self.run
        try:
            record = run.verification()
        except ApplianceError as exc:
            files.update(f"[red]{escape(exc.message)}[/]\n{escape(exc.hint)}")
            return
        if record is None:
            files.update("Nothing exported yet: choose quantizations and press Export (ctrl+s).")
            return
        lines = [f"[b]{escape(str(record.name))}[/b] in {escape(str(run.gguf_dir))}"]
        for entry in record.files:
            state = "[green]verified[/]" if entry.passed else "[red]rejected[/]"
            extra = f", agreement {entry.agreement * 100:.0f}%" if entry.agreement is not None else ""
            extra += f", ppl {entry.ppl_delta * 100:+.2f}%" if entry.ppl_delta is not None else ""
            lines.append(f"{escape(entry.file)}: {state}, {entry.size_bytes / 2**20:,.0f} MiB{extra}")
        if (run.gguf_dir / "Modelfile").is_file():
            lines.append(f"Modelfile: {escape(str(run.gguf_dir / 'Modelfile'))}")
        if record.rejected_dir:
            lines.append(f"[red]rejected files in {escape(record.rejected_dir)}[/]")
        files.update("\n".join(lines))
        table.add_columns("file", "check", "result", "detail")
        for entry in record.files:
            for check in entry.checks:
                table.add_row(Text(entry.quant), Text(check.name), MARK.get(check.status, Text(check.status)),
                              Text(check.detail[:100]))

    @on(Button.Pressed, "#export-start")
    def action_start(self) -> None:
        panel = self.query_one(JobPanel)
        if panel.running:
            self.notify("The export is running.", severity="warning")
            return
        if not self.run.trained:
            self.notify("Train the run first: there is no adapter to export.", severity="error")
            return
        chosen: SelectionList[str] = self.query_one("#export-quants", SelectionList)
        ppl = self.query_one("#export-ppl", Input).value.strip()
        try:
            cfg = validated(ExportConfig, {"quants": list(chosen.selected), "ppl_tokens": ppl,
                                           "store": str(self.store.root)},
                            name=lambda field: {"ppl_tokens": "perplexity tokens"}.get(field, field))
        except ApplianceError as exc:
            self.notify(exc.message, title="Check the settings", severity="error")
            return
        job = self.start_job("export", cfg)
        if job is not None:
            panel.follow(job)

    @on(JobEnded)
    def _ended(self, message: JobEnded) -> None:
        if message.done is not None:
            self.query_one(JobPanel).say("[green]done[/]: every file below passed the verification gate; c to chat"
                                         if not message.done.result.get("rejected") else
                                         "[yellow]done, with rejected files[/]: see below")
        self.show()
