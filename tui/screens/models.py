"""Models: the base models in the store with their details, and importing one from a Hugging
Face-layout folder, a .gguf file or a catalog name, as a job."""

from __future__ import annotations

from typing import ClassVar

from rich.markup import escape
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, DataTable, Footer, Header, Input, Static

from appliance import jobs
from appliance.config import ImportConfig
from appliance.errors import ApplianceError
from appliance.fields import validated
from tui.follow import JobEnded
from tui.screens.base import AppScreen
from tui.widgets.job_panel import JobPanel


class ModelsScreen(AppScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "app.pop_screen", "Back", priority=True),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("[b]Models[/b] in the store", id="models-title")
        with Horizontal(id="models-top"):
            yield DataTable(id="models-table", cursor_type="row")
            yield Static("", id="models-detail")
        with Vertical(id="models-import"):
            with Horizontal(classes="field"):
                yield Static("import", classes="field-label")
                yield Input(id="models-source", placeholder="a folder with *.safetensors, a .gguf file, or 'default'")
            with Horizontal(classes="field"):
                yield Static("name", classes="field-label")
                yield Input(id="models-name", placeholder="optional: derived from the source")
            yield Button("Import", id="models-start", variant="primary", compact=True)
        yield JobPanel("models", idle="")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#models-table", DataTable)
        table.add_columns("name", "architecture", "parameters", "context", "template")
        self.show()

    def show(self) -> None:
        store = self.store
        table = self.query_one("#models-table", DataTable)
        table.clear()
        models = store.list_models()
        for info in models:
            table.add_row(Text(info.name), Text(info.architecture), Text(f"{info.parameters / 1e6:,.0f} M"),
                          Text(str(info.context_length or "")), Text("yes" if info.chat_template else "no"),
                          key=info.name)
        if not models:
            self.query_one("#models-detail", Static).update("No base model yet: import 'default' (the embedded "
                                                            "SmolLM2-135M-Instruct) below.")
        else:
            self._detail(models[0].name)

    @on(DataTable.RowHighlighted, "#models-table")
    def _highlighted(self, message: DataTable.RowHighlighted) -> None:
        if message.row_key.value:
            self._detail(str(message.row_key.value))

    def _detail(self, name: str) -> None:
        store = self.store
        info = store.get_model(name)
        source = info.source
        lines = [f"[b]{escape(info.name)}[/b] ({escape(info.model_type)}, {info.num_layers} layers, hidden "
                 f"{info.hidden_size}, vocab {info.vocab_size:,}, {escape(info.dtype)})",
                 f"license: {escape(info.license or 'not stated')}",
                 f"from: {escape(source.kind)} {escape(source.location)}"
                 + (f" ({escape(source.package or '')} {escape(source.package_version or '')})" if source.package
                    else ""),
                 f"imported {escape(info.imported_at)}, {len(info.files)} files with sha256",
                 *(f"[yellow]{escape(note)}[/]" for note in info.notes)]
        self.query_one("#models-detail", Static).update("\n".join(lines))

    @on(Button.Pressed, "#models-start")
    def _import(self) -> None:
        panel = self.query_one(JobPanel)
        if panel.running:
            self.notify("An import is running.", severity="warning")
            return
        store = self.store
        settings = {"source": self.query_one("#models-source", Input).value.strip(),
                    "name": self.query_one("#models-name", Input).value.strip() or None, "store": str(store.root)}
        try:
            cfg = validated(ImportConfig, settings, name=lambda field: field)
            panel.follow(jobs.start("import", store.new_job_dir("import"), cfg))
        except ApplianceError as exc:
            self.notify(f"{exc.message}\n{exc.hint}", title=exc.title, severity="error")

    @on(JobEnded)
    def _ended(self, message: JobEnded) -> None:
        if message.done is not None:
            self.query_one(JobPanel).say(f"[green]imported[/] {escape(str(message.done.result.get('name', '')))}")
            self.show()
