"""An error that nothing else showed, in a modal: what went wrong, what to do, and where the details are."""

from __future__ import annotations

from typing import ClassVar

from rich.markup import escape
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Static


class ErrorScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "dismiss", "Close"),
                                              Binding("enter", "dismiss", "Close")]

    def __init__(self, title: str, message: str, hint: str = "", log: str | None = None) -> None:
        super().__init__()
        self.error_title, self.message, self.hint, self.log_file = title, message, hint, log

    def compose(self) -> ComposeResult:
        with Vertical(id="error"):
            yield Static(f"[b red]{escape(self.error_title)}[/]", id="error-title")
            yield Static(escape(self.message), id="error-message")
            if self.hint:
                yield Static(f"[dim]{escape(self.hint)}[/]", id="error-hint")
            if self.log_file:
                yield Static(f"details: {escape(self.log_file)}", id="error-log")
            yield Button("Close", id="error-close", variant="primary", compact=True)

    def on_button_pressed(self) -> None:
        self.dismiss()
