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

from appliance import jobs
from appliance.config import ExportConfig
from appliance.quants import QUANTS, RECOMMENDED
from appliance.fsutil import read_json_object
from tui.follow import JobEnded
from tui.screens.run import RunScreen
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
        job = jobs.attach(self.run_dir)
        if job is not None and job.stage == "export" and job.running():
            self.query_one(JobPanel).follow(job)

    @work(thread=True, exclusive=True, group="sizes", exit_on_error=False)
    def predict_sizes(self) -> None:
        """Predicted sizes from the tensor shapes of the base model (the merged model has the same)."""
        from appliance.errors import ApplianceError
        from appliance import quants

        store = self.app.store  # type: ignore[attr-defined]
        try:
            from appliance.export.run import base_model_of

            model_dir = store.model_dir(base_model_of(store, self.run_dir))
            sizes = {name: quants.predict(model_dir, name).bytes for name in QUANTS}
        except (ApplianceError, OSError, ValueError, KeyError):
            return  # no trained run yet: the list stays without sizes
        self.app.call_from_thread(self._sizes, sizes)

    def _sizes(self, sizes: dict[str, int]) -> None:
        chooser = self.query_one("#export-quants", SelectionList)
        chosen = set(chooser.selected)
        chooser.clear_options()
        for q in QUANTS.values():
            if q.name in ("F16", "BF16"):
                continue
            prompt = f"{q.name} ~{sizes[q.name] / 2**20:,.0f} MiB: {q.description}"
            chooser.add_option(Selection(prompt, q.name, q.name in chosen))

    def show(self) -> None:
        folder = self.run_dir / "gguf"
        record = read_json_object(folder / "verification.json")
        table = self.query_one("#export-checks", DataTable)
        table.clear(columns=True)
        if not record:
            self.query_one("#export-files", Static).update("Nothing exported yet: choose quantizations and press "
                                                           "Export (ctrl+s).")
            return
        lines = [f"[b]{escape(str(record.get('name')))}[/b] in {escape(str(folder))}"]
        for entry in record.get("files", []):
            size = entry.get("size_bytes", 0) / 2**20
            state = "[green]verified[/]" if entry.get("passed") else "[red]rejected[/]"
            extra = f", agreement {entry['agreement'] * 100:.0f}%" if entry.get("agreement") is not None else ""
            extra += f", ppl {entry['ppl_delta'] * 100:+.2f}%" if entry.get("ppl_delta") is not None else ""
            lines.append(f"{escape(entry['file'])}: {state}, {size:,.0f} MiB{extra}")
        if (folder / "Modelfile").is_file():
            lines.append(f"Modelfile: {escape(str(folder / 'Modelfile'))}")
        if record.get("rejected_dir"):
            lines.append(f"[red]rejected files in {escape(str(record['rejected_dir']))}[/]")
        self.query_one("#export-files", Static).update("\n".join(lines))
        table.add_columns("file", "check", "result", "detail")
        for entry in record.get("files", []):
            for check in entry.get("checks", []):
                table.add_row(Text(entry["quant"]), Text(check["name"]),
                              MARK.get(check["status"], Text(check["status"])), Text(check.get("detail", "")[:100]))

    @on(Button.Pressed, "#export-start")
    def action_start(self) -> None:
        panel = self.query_one(JobPanel)
        if panel.running:
            self.notify("The export is running.", severity="warning")
            return
        if not (self.run_dir / "adapter").is_dir():
            self.notify("Train the run first: there is no adapter to export.", severity="error")
            return
        from pydantic import ValidationError

        chosen = list(self.query_one("#export-quants", SelectionList).selected)
        store = self.app.store  # type: ignore[attr-defined]
        ppl = self.query_one("#export-ppl", Input).value.strip()
        try:
            cfg = ExportConfig(quants=chosen, ppl_tokens=int(ppl) if ppl.isdigit() else ppl, store=str(store.root))
        except ValidationError as exc:
            self.notify("; ".join(f"{e['loc'][0]}: {e['msg']}" for e in exc.errors()), title="Check the settings",
                        severity="error")
            return
        job = self.start_job("export", cfg, record=cfg.model_dump(mode="json"))
        if job is not None:
            panel.follow(job)

    @on(JobEnded)
    def _ended(self, message: JobEnded) -> None:
        if message.done is not None:
            self.query_one(JobPanel).say("[green]done[/]: every file below passed the verification gate; c to chat"
                                         if not message.done.result.get("rejected") else
                                         "[yellow]done, with rejected files[/]: see below")
        self.show()
